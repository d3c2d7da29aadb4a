//! `--configmap-namespace-selector`: a Kubernetes label selector (`k=v`, `k==v`, `k!=v`, `k`,
//! `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated, all must hold). Sent to the API server
//! with the Namespace watch (in its canonical form, `Display`), and matched again locally.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    selector: String,
    reason: String,
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, SelectorError> {
        let fail = |reason: &str| SelectorError {
            selector: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut requirements = Vec::new();
        for term in split_terms(text).map_err(&fail)? {
            let term = term.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(fail("empty term"));
            }
            requirements.push(parse_term(term).map_err(|r| fail(&r))?);
        }
        Ok(Self { requirements })
    }
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced parentheses");
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key)?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key_of(key)?, value_of(value)?));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key_of(key)?, value_of(value)?));
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words.as_slice() {
        let rest = rest.trim();
        let (negated, list) = if let Some(list) = rest.strip_prefix("notin") {
            (true, list)
        } else if let Some(list) = rest.strip_prefix("in") {
            (false, list)
        } else {
            return Err(format!("unknown operator in {term:?}"));
        };
        let list = list
            .trim()
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| format!("{term:?}: the values go in parentheses"))?;
        let values = list
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        // As the API server, which would refuse the watch: a set needs a value.
        if values.iter().all(String::is_empty) {
            return Err(format!("{term:?}: the set has no value"));
        }
        let key = key_of(key)?;
        return Ok(if negated {
            Requirement::NotIn(key, values)
        } else {
            Requirement::In(key, values)
        });
    }
    Ok(Requirement::Exists(key_of(term)?))
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
fn key_of(key: &str) -> Result<String, String> {
    let key = key.trim();
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = is_label_value(name) && !name.is_empty();
    let prefix_ok = prefix.is_none_or(crate::pki::identity::is_dns1123_subdomain);
    if name_ok && prefix_ok {
        Ok(key.to_owned())
    } else {
        Err(format!("{key:?} is not a label key"))
    }
}

fn value_of(value: &str) -> Result<String, String> {
    let value = value.trim();
    if is_label_value(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

/// Empty, or up to 63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.is_empty()
        || (bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

/// Kubernetes' label-selector syntax, what the API server parses.
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match requirement {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::NotExists(k) => write!(f, "!{k}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
            }
        }
        Ok(())
    }
}

impl Selector {
    /// True when every requirement holds (an empty selector matches everything).
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key));
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn matches_like_kubernetes() {
        let injected = labels(&[("istio-injection", "enabled"), ("team", "a")]);
        let revision = labels(&[("istio.io/rev", "canary"), ("team", "b")]);
        let none = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("", [true, true, true]),
            ("istio-injection=enabled", [true, false, false]),
            ("istio-injection==enabled", [true, false, false]),
            ("istio-injection!=enabled", [false, true, true]),
            ("istio.io/rev", [false, true, false]),
            ("!istio.io/rev", [true, false, true]),
            ("team in (a, c)", [true, false, false]),
            ("team notin (a)", [false, true, true]),
            ("team, istio-injection=enabled", [true, false, false]),
        ];
        for (text, expected) in cases {
            let selector: Selector = text.parse().unwrap();
            let got = [
                selector.matches(Some(&injected)),
                selector.matches(Some(&revision)),
                selector.matches(Some(&none)),
            ];
            assert_eq!(&got, expected, "{text:?}");
        }
        assert!("!team".parse::<Selector>().unwrap().matches(None));
    }

    #[test]
    fn renders_what_it_parsed_in_the_api_servers_syntax() {
        for (text, canonical) in [
            ("", ""),
            ("a==b", "a=b"),
            (" a = b , !c", "a=b,!c"),
            ("istio.io/rev!=canary,d", "istio.io/rev!=canary,d"),
            ("team in ( a , c ),x notin (y)", "team in (a,c),x notin (y)"),
        ] {
            let selector: Selector = text.parse().unwrap();
            assert_eq!(selector.to_string(), canonical, "{text:?}");
            assert_eq!(canonical.parse::<Selector>().unwrap(), selector);
        }
    }

    #[test]
    fn refuses_malformed_selectors() {
        for text in [
            "a=b,",
            ",a",
            "team in a,b",
            "team in (a",
            "team like (a)",
            "bad key=x",
            "-a=b",
            "a=-b",
            "a=(b)",
            "team in ((a))",
            "team in ()",
            "team notin ( )",
        ] {
            assert!(text.parse::<Selector>().is_err(), "{text:?} parsed");
        }
    }
}
