//! Scraping `GET /metrics` and parsing Prometheus' text exposition format
//! (0.0.4) strictly: HELP and TYPE before a family's samples, each family
//! declared once, label values quoted with `\\`, `\"` and `\n` escapes,
//! values as Go's `ParseFloat` reads them (`+Inf`, `-Inf`, `NaN` too),
//! samples named by their family (`_total` for counters; `_bucket`, `_sum`,
//! `_count` for histograms), histogram buckets cumulative and ending at
//! `le="+Inf"` equal to `_count`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One sample: its metric name, labels in exposition order, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// `name{k="v",...}` in exposition order (label values unescaped).
    pub fn key(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: families' types and every sample.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples keyed by [`Sample::key`].
    pub fn by_key(&self) -> BTreeMap<String, f64> {
        self.samples.iter().map(|s| (s.key(), s.value)).collect()
    }

    /// Samples of metric `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the one sample of `name` with no labels.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.named(name)
            .find(|s| s.labels.is_empty())
            .map(|s| s.value)
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
    }
}

/// Label pairs in exposition order.
pub type Labels = Vec<(String, String)>;

/// Parses `{k="v",...}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = rest[..eq].trim();
        if !is_name(key, false) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..].trim_start();
        rest = rest.strip_prefix('"').ok_or("unquoted label value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} twice"));
        }
        labels.push((key.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected , or }".into());
        }
    }
}

/// The family a sample named `name` belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            types.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then_some(base)
    })
}

/// Parses an exposition, failing on the first line that breaks the format.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut helped = BTreeMap::<String, ()>::new();
    let mut seen_samples = BTreeMap::<String, ()>::new();
    for (n, line) in text.lines().enumerate() {
        let fail = |why: String| format!("line {}: {why}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _)
                    if !is_name(name, true) || helped.insert(name.into(), ()).is_some() =>
                {
                    return Err(fail("bad or repeated HELP".into()));
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    let kind = kind.trim();
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(fail(format!("unknown type {kind}")));
                    }
                    if seen_samples.contains_key(name) {
                        return Err(fail("TYPE after samples".into()));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(fail("repeated TYPE".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| fail("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(fail("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(fail)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| fail("no value".into()))?).map_err(fail)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| fail("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(fail("trailing text".into()));
        }
        let family = family_of(name, &out.types).unwrap_or(name).to_string();
        if out.types.get(&family).map(String::as_str) == Some("counter")
            && !name.ends_with("_total")
        {
            return Err(fail("a counter without _total".into()));
        }
        seen_samples.insert(family, ());
        out.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    check_histograms(&out)?;
    Ok(out)
}

/// Every histogram series: buckets cumulative, a `+Inf` bucket equal to `_count`.
fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, _) in e.types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series = BTreeMap::<Vec<(String, String)>, Vec<(f64, f64)>>::new();
        for s in e.named(&bucket) {
            let le = s.label("le").ok_or(format!("{bucket} without le"))?;
            let le = parse_value(le)?;
            let rest: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .cloned()
                .collect();
            series.entry(rest).or_default().push((le, s.value));
        }
        for (labels, buckets) in series {
            let mut prev = (f64::NEG_INFINITY, 0.0);
            for &(le, count) in &buckets {
                if le <= prev.0 || count < prev.1 {
                    return Err(format!("{bucket}{labels:?}: buckets not cumulative"));
                }
                prev = (le, count);
            }
            let count_name = format!("{family}_count");
            let count = e
                .named(&count_name)
                .find(|s| s.labels == labels)
                .map(|s| s.value);
            if prev.0 != f64::INFINITY || count != Some(prev.1) {
                return Err(format!("{bucket}{labels:?}: +Inf bucket != _count"));
            }
        }
    }
    Ok(())
}

/// `GET /metrics` at `addr`: the content type and the body.
pub fn get(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answered {head}")));
    }
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((content_type, body.to_string()))
}

/// Scrapes and parses `addr`'s metrics, panicking on a broken exposition.
pub fn scrape(addr: SocketAddr) -> Exposition {
    let (content_type, body) = get(addr).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse(&body).unwrap_or_else(|e| panic!("{addr}'s metrics: {e}\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_exposition_parses_with_escapes_and_histograms() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{s=\"x\\\"y\\\\z\\n\"} 3\n\
            # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n\
            up 1 1700000000000\n";
        let e = parse(text).unwrap();
        assert_eq!(e.samples[0].label("s"), Some("x\"y\\z\n"));
        assert_eq!(e.value("h_count"), Some(2.0));
        assert_eq!(e.value("up"), Some(1.0));
    }

    #[test]
    fn broken_expositions_are_refused() {
        for bad in [
            "a{b=\"c} 1\n",
            "a{b=c} 1\n",
            "a 1x\n",
            "# TYPE a counter\na 1\n",
            "a_total 1\n# TYPE a_total counter\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\n",
            "1a 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
