//! containerd's filter syntax, as the snapshots `List` call sends it: a request carries several
//! filters (any may match); a filter is a comma-separated conjunction of selectors
//! `FIELDPATH [OP VALUE]` with OP one of `==`, `!=`, `~=` (regular expression) and no OP
//! meaning "present and non-empty". Field paths for snapshots: `name`, `parent`, `kind`,
//! `labels.KEY` (KEY quoted when it holds dots or slashes: `labels."containerd.io/snapshot.ref"`).
//! Values are bare (up to the next comma) or quoted like Go strings; regexps may also be
//! `/…/`-delimited.
//!
//! Hand-written: this is containerd's own small grammar (`filters/parser.go`), for which no crate
//! exists; the parser is bounded by the input length and never panics.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("filter {filter:?}: {reason}")]
pub struct FilterError {
    pub filter: String,
    pub reason: String,
}

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(regex::Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// One filter: all selectors must match.
#[derive(Debug)]
pub struct Filter(Vec<Selector>);

/// What a filter sees of a snapshot.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Filters longer than this are refused (containerd's are a few hundred bytes).
const MAX_FILTER: usize = 16 << 10;

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
    filter: &'a str,
}

impl Scanner<'_> {
    fn err(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            filter: self.filter.to_string(),
            reason: format!("{} (at byte {})", reason.into(), self.i),
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    /// A Go-style quoted string (`"…"` or `` `…` ``) or a `/…/` regexp literal.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let Some(q) = self.peek() else {
            return Err(self.err("expected a quoted string"));
        };
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated quoted string"));
            };
            self.i += 1;
            if c == q {
                break;
            }
            if c == b'\\' && q != b'`' {
                let Some(e) = self.peek() else {
                    return Err(self.err("unterminated escape"));
                };
                self.i += 1;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'\\' => out.push(b'\\'),
                    b'"' => out.push(b'"'),
                    b'/' if q == b'/' => out.push(b'/'),
                    // In a regexp literal other escapes belong to the regexp.
                    other if q == b'/' => out.extend([b'\\', other]),
                    other => {
                        return Err(self.err(format!("unsupported escape \\{}", other as char)));
                    }
                }
                continue;
            }
            out.push(c);
        }
        String::from_utf8(out).map_err(|_| self.err("quoted string is not UTF-8"))
    }
    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        match self.peek() {
            Some(b'"' | b'`') => self.quoted(),
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(self.err("expected a field name"));
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }
    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        match self.peek() {
            Some(b'"' | b'`' | b'/') => self.quoted(),
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c != b',') {
                    self.i += 1;
                }
                let v = String::from_utf8_lossy(&self.s[start..self.i])
                    .trim()
                    .to_string();
                if v.is_empty() {
                    return Err(self.err("expected a value"));
                }
                Ok(v)
            }
        }
    }
}

impl Filter {
    pub fn parse(filter: &str) -> Result<Filter, FilterError> {
        let mut sc = Scanner {
            s: filter.as_bytes(),
            i: 0,
            filter,
        };
        if filter.len() > MAX_FILTER {
            return Err(sc.err(format!("longer than {MAX_FILTER} bytes")));
        }
        let mut selectors = vec![];
        loop {
            let mut path = vec![sc.field()?];
            while sc.peek() == Some(b'.') {
                sc.i += 1;
                path.push(sc.field()?);
            }
            sc.skip_space();
            let rest = &sc.s[sc.i..];
            let op = if rest.starts_with(b"==") {
                sc.i += 2;
                Op::Eq(sc.value()?)
            } else if rest.starts_with(b"!=") {
                sc.i += 2;
                Op::Ne(sc.value()?)
            } else if rest.starts_with(b"~=") {
                sc.i += 2;
                let v = sc.value()?;
                Op::Matches(
                    regex::Regex::new(&v).map_err(|e| sc.err(format!("bad regexp {v:?}: {e}")))?,
                )
            } else {
                Op::Present
            };
            selectors.push(Selector { path, op });
            sc.skip_space();
            match sc.peek() {
                None => break,
                Some(b',') => sc.i += 1,
                Some(c) => return Err(sc.err(format!("unexpected {:?}", c as char))),
            }
        }
        Ok(Filter(selectors))
    }

    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.0.iter().all(|sel| {
            let value: Option<&str> = match sel.path.as_slice() {
                [name] if name == "name" => Some(f.name),
                [name] if name == "parent" => Some(f.parent),
                [name] if name == "kind" => Some(f.kind),
                [labels, key @ ..] if labels == "labels" && !key.is_empty() => {
                    f.labels.get(&key.join(".")).map(String::as_str)
                }
                _ => None,
            };
            match (&sel.op, value) {
                (Op::Present, v) => v.is_some_and(|v| !v.is_empty()),
                (Op::Eq(want), v) => v == Some(want.as_str()),
                (Op::Ne(want), v) => v != Some(want.as_str()),
                (Op::Matches(re), v) => v.is_some_and(|v| re.is_match(v)),
            }
        })
    }
}

/// Whether a snapshot passes a request's filters (none = all; otherwise any of them).
pub fn any_matches(filters: &[Filter], f: &Fields<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|x| x.matches(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a BTreeMap<String, String>) -> Fields<'a> {
        Fields {
            name: "sha256:abc",
            parent: "default/3/sha256:def",
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn containerd_metadata_filter() {
        let labels: BTreeMap<String, String> = [
            (
                "containerd.io/snapshot.ref".to_string(),
                "sha256:abc".to_string(),
            ),
            ("x".to_string(), "".to_string()),
        ]
        .into();
        // What containerd's metadata sends after a remote AlreadyExists.
        let f = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def""#,
        )
        .unwrap();
        assert!(f.matches(&fields(&labels)));
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abd"#).unwrap();
        assert!(!f.matches(&fields(&labels)));
        for (expr, want) in [
            ("kind==committed", true),
            ("kind!=committed", false),
            ("kind==active", false),
            (r#"name~=/^sha256:a/"#, true),
            (r#"name~="^x""#, false),
            ("labels.x", false),
            ("labels.y", false),
            (r#"labels."containerd.io/snapshot.ref""#, true),
            ("parent==default/3/sha256:def", true),
            ("name", true),
            (" name == sha256:abc , kind == committed ", true),
        ] {
            let f = Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            assert_eq!(f.matches(&fields(&labels)), want, "{expr}");
        }
        let any = [
            Filter::parse("kind==view").unwrap(),
            Filter::parse("name==sha256:abc").unwrap(),
        ];
        assert!(any_matches(&any, &fields(&labels)));
        assert!(any_matches(&[], &fields(&labels)));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "",
            "==x",
            "name==",
            "name==\"open",
            "name~=\"(\"",
            "labels.\"k\\q\"==v",
            "name==a,",
            "na me==x",
            "labels.containerd.io/snapshot.ref",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(Filter::parse(&"a".repeat(MAX_FILTER + 1)).is_err());
    }
}
