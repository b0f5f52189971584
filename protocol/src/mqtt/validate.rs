//! Checks the MQTT specification requires of a server and the wire codec leaves undone.
//!
//! Measured on `rmqtt-codec` 0.3.1 (protocol/README.md): it accepts `+`/`#` in PUBLISH topics,
//! U+0000 in strings, filters such as `a/#/b` or `a+`, and a 3.1.1 password without a user
//! name. Every decoded packet passes through [`check_packet`] before anyone sees it.

use super::error::MqttError;
use super::packet::{Connect, Packet, Version};

/// `Ok` if `topic` is a valid topic name: non-empty, no wildcard, no U+0000 (MQTT 3.1.1 §4.7).
///
/// # Errors
/// [`MqttError::InvalidTopic`] or [`MqttError::NulInString`].
pub fn check_topic_name(topic: &str) -> Result<(), MqttError> {
    if topic.contains('\0') {
        return Err(MqttError::NulInString { field: "topic" });
    }
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(MqttError::InvalidTopic(topic.to_owned()));
    }
    Ok(())
}

/// `Ok` if `filter` is a valid topic filter: non-empty, no U+0000, `+` only as a whole level,
/// `#` only as the whole last level (MQTT 3.1.1 §4.7.1).
///
/// # Errors
/// [`MqttError::InvalidFilter`] or [`MqttError::NulInString`].
pub fn check_topic_filter(filter: &str) -> Result<(), MqttError> {
    if filter.contains('\0') {
        return Err(MqttError::NulInString { field: "topic_filter" });
    }
    if filter.is_empty() {
        return Err(MqttError::InvalidFilter(String::new()));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        let bad = match level {
            "#" => !is_last,
            "+" => false,
            other => other.contains(['+', '#']),
        };
        if bad {
            return Err(MqttError::InvalidFilter(filter.to_owned()));
        }
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str) -> Result<(), MqttError> {
    if s.contains('\0') { Err(MqttError::NulInString { field }) } else { Ok(()) }
}

fn check_connect(c: &Connect) -> Result<(), MqttError> {
    check_text("client_id", &c.client_id)?;
    if let Some(user) = &c.username {
        check_text("username", user)?;
    }
    // MQTT-3.1.2-22: in 3.1.x a password needs a user name; 5.0 lifted the rule.
    if c.version.is_v3() && c.password.is_some() && c.username.is_none() {
        return Err(MqttError::PasswordWithoutUsername);
    }
    if let Some(will) = &c.will {
        check_topic_name(&will.topic)?;
    }
    Ok(())
}

/// Runs every check that applies to `packet`.
///
/// # Errors
/// The first rule the packet breaks.
pub fn check_packet(packet: &Packet) -> Result<(), MqttError> {
    match packet {
        Packet::Connect(c) => check_connect(c),
        Packet::Publish(p) => check_topic_name(&p.topic),
        Packet::Subscribe { filters, .. } => {
            if filters.is_empty() {
                return Err(MqttError::NoFilter);
            }
            filters.iter().try_for_each(|(f, _)| check_topic_filter(f))
        }
        Packet::Unsubscribe { filters, .. } => {
            if filters.is_empty() {
                return Err(MqttError::NoFilter);
            }
            filters.iter().try_for_each(|f| check_topic_filter(f))
        }
        _ => Ok(()),
    }
}

/// The version a 3.1.x CONNECT announced (the codec shares one type for both levels).
pub(crate) fn v3_version(level: u8) -> Version {
    if level == rmqtt_codec::types::MQTT_LEVEL_31 { Version::V3_1 } else { Version::V3_1_1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(check_topic_name("vehicles/LSVAU2180N2183294/up/ota_status").is_ok());
        assert!(check_topic_name("a").is_ok());
        assert!(check_topic_name("/").is_ok());
        for bad in ["", "a/+", "a/#", "a+", "#", "a/b#"] {
            assert!(matches!(check_topic_name(bad), Err(MqttError::InvalidTopic(_))), "{bad}");
        }
        assert!(matches!(check_topic_name("a\0b"), Err(MqttError::NulInString { .. })));
    }

    #[test]
    fn topic_filters() {
        for good in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "a/b/c", "+/#", "sport/tennis/+"] {
            assert!(check_topic_filter(good).is_ok(), "{good}");
        }
        for bad in ["", "a/#/b", "a+", "a/b+", "#/a", "a#", "a/+b/c", "##"] {
            assert!(matches!(check_topic_filter(bad), Err(MqttError::InvalidFilter(_))), "{bad}");
        }
        assert!(matches!(check_topic_filter("a/\0"), Err(MqttError::NulInString { .. })));
    }
}
