//! Keyset pagination for the list routes (devices, cabinets, vehicles, orders).
//!
//! A page ends with an opaque cursor naming the last row's sort key; the next page starts
//! strictly after it (`WHERE (sort, id) < ($at, $id)`), so a page costs the same at row ten and
//! at row ten million and a row inserted meanwhile neither repeats nor shifts the rest (an
//! `OFFSET` would). Each filter is a condition an index serves: the indexes are in
//! `migrations/0015_list_indexes.sql`, and `tests/lists.rs` checks every query's plan.
//!
//! [`Select`] builds one query from the filters present (no `$1 IS NULL OR ...`), so the
//! statement PostgreSQL plans is the one the test explains.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::types::ToSql;

use crate::error::StoreError;

/// The most rows one page may hold, and the default.
pub const MAX_LIMIT: i64 = 500;
/// Rows per page when the caller does not say.
pub const DEFAULT_LIMIT: i64 = 50;

/// One page of a list.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The rows, in the list's order.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// Where a page starts: after the row with this sort time (if the list is sorted by time) and
/// id. Opaque to clients: hex of `"{micros}/{id}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The last row's sort time, microseconds since the Unix epoch (PostgreSQL's precision).
    pub at_us: Option<i64>,
    /// The last row's id.
    pub id: String,
}

impl Cursor {
    /// The cursor after a row sorted by `at` (or by id alone).
    pub fn after(at: Option<SystemTime>, id: impl Into<String>) -> Self {
        let at_us = at.map(|t| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        });
        Cursor { at_us, id: id.into() }
    }

    /// The opaque form handed to clients.
    pub fn encode(&self) -> String {
        let at = self.at_us.map(|t| t.to_string()).unwrap_or_default();
        hex::encode(format!("{at}/{}", self.id))
    }

    /// Reads a client's cursor.
    ///
    /// # Errors
    /// `Invalid("cursor")` for anything [`Cursor::encode`] did not write.
    pub fn decode(s: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::invalid("cursor", "not a cursor from a previous page");
        if s.len() > 1024 {
            return Err(bad());
        }
        let raw = String::from_utf8(hex::decode(s).map_err(|_| bad())?).map_err(|_| bad())?;
        let (at, id) = raw.split_once('/').ok_or_else(bad)?;
        let at_us = if at.is_empty() { None } else { Some(at.parse::<i64>().map_err(|_| bad())?) };
        Ok(Cursor { at_us, id: id.to_owned() })
    }

    /// The sort time as PostgreSQL takes it.
    ///
    /// # Errors
    /// `Invalid("cursor")` when the cursor has no time (it came from a list sorted otherwise).
    pub fn time(&self) -> Result<SystemTime, StoreError> {
        let us = self.at_us.ok_or_else(|| StoreError::invalid("cursor", "from a list sorted otherwise"))?;
        let d = Duration::from_micros(us.unsigned_abs());
        Ok(if us >= 0 { SystemTime::UNIX_EPOCH + d } else { SystemTime::UNIX_EPOCH - d })
    }
}

/// A page size from the query string: 1..=[`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
///
/// # Errors
/// `Invalid("limit")` outside that range.
pub fn limit(given: Option<i64>) -> Result<i64, StoreError> {
    let limit = given.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(StoreError::invalid("limit", format!("1..={MAX_LIMIT}")))
    }
}

/// A time in ms since the Unix epoch (query strings) as PostgreSQL takes it.
pub fn time_of_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Parameters of a statement, owned.
pub type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// A `SELECT` with the conditions of the filters given.
pub struct Select {
    head: String,
    conditions: Vec<String>,
    params: Params,
}

impl std::fmt::Debug for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Select").field("head", &self.head).field("conditions", &self.conditions).finish_non_exhaustive()
    }
}

impl Select {
    /// `head` is the query up to (not including) `WHERE`.
    pub fn new(head: impl Into<String>) -> Self {
        Select { head: head.into(), conditions: Vec::new(), params: Vec::new() }
    }

    /// Adds the condition `template`, whose `$` stands for this value's placeholder.
    pub fn bind<T: ToSql + Sync + Send + 'static>(&mut self, template: &str, value: T) -> &mut Self {
        self.params.push(Box::new(value));
        let placeholder = format!("${}", self.params.len());
        self.conditions.push(template.replace('$', &placeholder));
        self
    }

    /// Adds the condition `template` with two values (`$a`, `$b`), for a keyset comparison.
    pub fn bind2<A, B>(&mut self, template: &str, a: A, b: B) -> &mut Self
    where
        A: ToSql + Sync + Send + 'static,
        B: ToSql + Sync + Send + 'static,
    {
        self.params.push(Box::new(a));
        let pa = format!("${}", self.params.len());
        self.params.push(Box::new(b));
        let pb = format!("${}", self.params.len());
        self.conditions.push(template.replace("$a", &pa).replace("$b", &pb));
        self
    }

    /// Adds a condition without a value.
    pub fn and(&mut self, condition: &str) -> &mut Self {
        self.conditions.push(condition.to_owned());
        self
    }

    /// The statement with `tail` (`ORDER BY ...`) and `LIMIT limit + 1` (the extra row says
    /// whether another page follows), and its parameters.
    pub fn finish(mut self, tail: &str, limit: i64) -> (String, Params) {
        let mut sql = self.head;
        if !self.conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&self.conditions.join(" AND "));
        }
        self.params.push(Box::new(limit + 1));
        sql.push_str(&format!(" {tail} LIMIT ${}", self.params.len()));
        (sql, self.params)
    }
}

/// The parameters as `query` takes them.
pub fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// `LIKE` pattern for ids starting with `prefix` (its `%`, `_` and `\` taken literally).
pub fn prefix_pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// Cuts the extra row [`Select::finish`] asked for and names the cursor after the last kept.
pub fn page<T>(mut items: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> Cursor) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(0);
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = if more { items.last().map(|last| cursor_of(last).encode()) } else { None };
    Page { items, next_cursor }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_written() {
        let c = Cursor::after(Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456)), "o/1");
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert_eq!(c.time().unwrap(), SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456));
        let k = Cursor::after(None, "cab:x");
        assert_eq!(Cursor::decode(&k.encode()).unwrap(), k);
        assert!(k.time().is_err());
    }

    #[test]
    fn a_forged_cursor_is_refused() {
        for bad in ["zz", "", &hex::encode("no-slash"), &hex::encode("12x/a"), &"ab".repeat(600)] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn placeholders_are_numbered_in_order() {
        let mut s = Select::new("SELECT id FROM t");
        s.bind("a = $", 1i32).and("b IS NULL").bind2("(c, id) < ($a, $b)", 2i32, "x".to_owned());
        let (sql, params) = s.finish("ORDER BY c DESC, id DESC", 10);
        assert_eq!(
            sql,
            "SELECT id FROM t WHERE a = $1 AND b IS NULL AND (c, id) < ($2, $3) ORDER BY c DESC, id DESC LIMIT $4"
        );
        assert_eq!(params.len(), 4);
    }

    #[test]
    fn like_wildcards_in_a_prefix_are_literal() {
        assert_eq!(prefix_pattern("a%b_c\\"), "a\\%b\\_c\\\\%");
    }

    #[test]
    fn a_page_names_the_next_only_when_more_rows_came() {
        let p = page(vec![1, 2, 3], 2, |n| Cursor::after(None, n.to_string()));
        assert_eq!(p.items, vec![1, 2]);
        assert_eq!(Cursor::decode(p.next_cursor.as_deref().unwrap()).unwrap().id, "2");
        assert!(page(vec![1, 2], 2, |n| Cursor::after(None, n.to_string())).next_cursor.is_none());
    }
}
