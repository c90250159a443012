//! containerd's list filters (`parent==KEY`, `labels."a/b"==v`, `kind!=view`,
//! `name~=sub`): filters are ORed, the comma-separated terms of one filter
//! ANDed. `~=` is a substring match here (containerd's is a regexp).

use crate::error::{Error, Result};
use containerd_snapshots::Info;

enum Op {
    Present,
    Eq(String),
    Ne(String),
    Contains(String),
}

struct Term {
    field: Vec<String>,
    op: Op,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_string()
    }
}

/// Split on `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            out.push(String::new());
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

fn parse_term(t: &str) -> Result<Term> {
    let (lhs, op) = if let Some((l, r)) = t.split_once("==") {
        (l, Op::Eq(unquote(r)))
    } else if let Some((l, r)) = t.split_once("!=") {
        (l, Op::Ne(unquote(r)))
    } else if let Some((l, r)) = t.split_once("~=") {
        (l, Op::Contains(unquote(r)))
    } else {
        (t, Op::Present)
    };
    let field: Vec<String> = split_outside_quotes(lhs.trim(), '.')
        .iter()
        .map(|p| unquote(p))
        .collect();
    if field.is_empty() || field[0].is_empty() {
        return Err(Error::Invalid(format!("bad filter term {t:?}")));
    }
    Ok(Term { field, op })
}

fn value_of(i: &Info, field: &[String]) -> Option<String> {
    match field {
        [f] if f == "name" => Some(i.name.clone()),
        [f] if f == "parent" => Some(i.parent.clone()).filter(|p| !p.is_empty()),
        [f] if f == "kind" => Some(format!("{:?}", i.kind).to_lowercase()),
        [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
            i.labels.get(&rest.join(".")).cloned()
        }
        _ => None,
    }
}

/// The filters, parsed once.
pub struct Filters(Vec<Vec<Term>>);

impl Filters {
    /// Parse containerd's filter strings.
    pub fn parse(fs: &[String]) -> Result<Filters> {
        let mut v = Vec::new();
        for f in fs.iter().filter(|f| !f.trim().is_empty()) {
            let terms = split_outside_quotes(f, ',')
                .iter()
                .map(|t| parse_term(t))
                .collect::<Result<Vec<_>>>()?;
            v.push(terms);
        }
        Ok(Filters(v))
    }

    /// Does `i` pass (no filter: everything passes)?
    pub fn matches(&self, i: &Info) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|terms| {
                terms.iter().all(|t| {
                    let v = value_of(i, &t.field);
                    match &t.op {
                        Op::Present => v.is_some(),
                        Op::Eq(x) => v.as_deref() == Some(x),
                        Op::Ne(x) => v.as_deref() != Some(x),
                        Op::Contains(x) => v.is_some_and(|v| v.contains(x.as_str())),
                    }
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match() {
        let mut i = Info {
            name: "default/2/sha256:ab".into(),
            parent: "default/1/sha256:cd".into(),
            ..Info::default()
        };
        i.labels.insert("containerd.io/gc.root".into(), "x".into());
        let ok = |f: &[&str]| {
            let v: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            Filters::parse(&v).unwrap().matches(&i)
        };
        assert!(ok(&[]));
        assert!(ok(&["parent==default/1/sha256:cd"]));
        assert!(!ok(&["parent==other"]));
        assert!(ok(&["labels.\"containerd.io/gc.root\""]));
        assert!(ok(&["labels.\"containerd.io/gc.root\"==x,name~=sha256"]));
        assert!(!ok(&["labels.\"containerd.io/gc.root\"==y"]));
        assert!(ok(&["parent==nope", "name==default/2/sha256:ab"]));
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any filter text parses or is refused (EINVAL), and what parses
        /// can be matched; a label filter built from any key and value
        /// (quotes, dots, commas in them) finds the label.
        #[test]
        fn any_filter_is_parsed_or_refused(
            fs in prop::collection::vec(".{0,40}", 0..4),
            key in "[a-z./\\-]{1,12}",
            value in "[a-z0-9,.=!~ ]{0,12}",
        ) {
            let mut i = Info {
                name: "ns/1/x".into(),
                ..Info::default()
            };
            i.labels.insert(key.clone(), value.clone());
            match Filters::parse(&fs) {
                Ok(f) => {
                    let _ = f.matches(&i);
                }
                Err(e) => prop_assert_eq!(e.errno(), libc::EINVAL),
            }
            let mine = vec![format!("labels.\"{key}\"==\"{value}\"")];
            prop_assert!(Filters::parse(&mine).unwrap().matches(&i), "{mine:?}");
        }
    }
}
