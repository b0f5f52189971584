//! One type for a secret held as text (a device's factory-provisioned key or token given to the
//! API, a key in configuration): read as a plain string, never shown by `Debug`, so it cannot
//! reach a log by accident.

use serde::Deserialize;

/// A secret string; `Debug` shows only whether it is set.
#[derive(Clone, Default, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "<unset>" } else { "<redacted>" })
    }
}
