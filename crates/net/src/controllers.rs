//! The controllers a client may talk to: one URL, or several replicas of
//! one cluster. A client sends to the current one and, when it cannot
//! reach it, moves to the next (round robin), so a replica's death costs
//! its clients one failed attempt each, not the cluster.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Controller URLs one client takes at most: replicas are a handful.
pub const CONTROLLER_URLS_MAX: usize = 16;

/// Why a list of controller URLs is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlsError {
    #[error("no controller URL given")]
    Empty,
    #[error("more than {CONTROLLER_URLS_MAX} controller URLs")]
    TooMany,
    #[error("{0:?} is not an http:// or https:// URL")]
    NotAUrl(String),
    #[error("the controller URLs mix http and https: every replica serves the same way")]
    MixedSchemes,
    #[error("{0} is given twice")]
    Duplicate(String),
}

/// Controller URLs (without a trailing slash) and which one is current.
#[derive(Debug)]
pub struct ControllerUrls {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl ControllerUrls {
    /// From `a,b,c` (as `--controller` and `HANDOVER_CONTROLLER` take them).
    pub fn parse(list: &str) -> Result<ControllerUrls, UrlsError> {
        let mut urls: Vec<String> = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let parsed = reqwest::Url::parse(raw).map_err(|_| UrlsError::NotAUrl(raw.into()))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(UrlsError::NotAUrl(raw.into()));
            }
            let url = raw.trim_end_matches('/').to_owned();
            if urls.contains(&url) {
                return Err(UrlsError::Duplicate(url));
            }
            urls.push(url);
        }
        if urls.is_empty() {
            return Err(UrlsError::Empty);
        }
        if urls.len() > CONTROLLER_URLS_MAX {
            return Err(UrlsError::TooMany);
        }
        let https = urls[0].starts_with("https://");
        if urls.iter().any(|u| u.starts_with("https://") != https) {
            return Err(UrlsError::MixedSchemes);
        }
        Ok(ControllerUrls {
            urls,
            current: AtomicUsize::new(0),
        })
    }

    /// The one to send to now.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    pub fn all(&self) -> &[String] {
        &self.urls
    }

    pub fn is_https(&self) -> bool {
        self.urls[0].starts_with("https://")
    }

    /// `url` could not be reached: if it is still the current one, the next
    /// becomes current (so requests failing together move on once, not once
    /// each). Returns the current one afterwards.
    pub fn failed(&self, url: &str) -> &str {
        let n = self.urls.len();
        let at = self.current.load(Ordering::Relaxed) % n;
        if n > 1 && self.urls[at] == url {
            let _ = self.current.compare_exchange(
                at,
                (at + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_parsed_and_checked() {
        let u = ControllerUrls::parse("https://a:7400/, https://b:7400").unwrap();
        assert_eq!(u.all(), ["https://a:7400", "https://b:7400"]);
        assert!(u.is_https());
        assert_eq!(ControllerUrls::parse(" ,").unwrap_err(), UrlsError::Empty);
        assert_eq!(
            ControllerUrls::parse("https://a,http://b").unwrap_err(),
            UrlsError::MixedSchemes
        );
        assert_eq!(
            ControllerUrls::parse("http://a,http://a/").unwrap_err(),
            UrlsError::Duplicate("http://a".into())
        );
        assert!(matches!(
            ControllerUrls::parse("ftp://a"),
            Err(UrlsError::NotAUrl(_))
        ));
        assert!(matches!(
            ControllerUrls::parse("a:7400"),
            Err(UrlsError::NotAUrl(_))
        ));
        let many = (0..=CONTROLLER_URLS_MAX)
            .map(|k| format!("http://h{k}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            ControllerUrls::parse(&many).unwrap_err(),
            UrlsError::TooMany
        );
    }

    #[test]
    fn a_failure_moves_on_once_and_wraps_around() {
        let u = ControllerUrls::parse("http://a,http://b,http://c").unwrap();
        assert_eq!(u.current(), "http://a");
        // Two requests that both failed on a: one move, not two.
        assert_eq!(u.failed("http://a"), "http://b");
        assert_eq!(u.failed("http://a"), "http://b");
        assert_eq!(u.failed("http://b"), "http://c");
        assert_eq!(u.failed("http://c"), "http://a");
        let one = ControllerUrls::parse("http://a").unwrap();
        assert_eq!(one.failed("http://a"), "http://a");
    }
}
