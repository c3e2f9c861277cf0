//! Merchant endpoints and SSRF (DESIGN.md §5): an endpoint must be
//! `https` (plain `http` only in sandbox mode) and must not reach a
//! loopback, private, link-local, shared or otherwise non-public address,
//! unless `webhook_allow_private` is set (tests). The URL is checked when a
//! merchant registers it, and every delivery resolves the name again
//! through [`PublicOnlyResolver`], so a name that later resolves inside the
//! network (DNS rebinding) is refused at the moment of the call.
//! Redirects are never followed.

use std::net::{IpAddr, SocketAddr};

use url::Url;

/// Why an endpoint URL was refused (the message is safe to show the
/// merchant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL, or one with credentials or a fragment.
    #[error("the endpoint is not a valid absolute URL without credentials or fragment")]
    Invalid,
    /// Not `https` (or `http` in sandbox mode).
    #[error("the endpoint must use https")]
    Scheme,
    /// It names or resolves to an address that is not public.
    #[error("the endpoint must resolve to public addresses only")]
    NotPublic,
    /// Its name does not resolve.
    #[error("the endpoint's host does not resolve")]
    Unresolvable,
}

/// What endpoints are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Plain `http` allowed (sandbox mode).
    pub allow_http: bool,
    /// Loopback and private addresses allowed (`webhook_allow_private`).
    pub allow_private: bool,
}

/// Longest accepted endpoint URL, bytes.
pub const MAX_URL_LEN: usize = 2_048;

impl EndpointPolicy {
    /// Checks `raw` and resolves its host once.
    ///
    /// # Errors
    /// [`EndpointError`].
    pub async fn check(&self, raw: &str) -> Result<Url, EndpointError> {
        if raw.len() > MAX_URL_LEN {
            return Err(EndpointError::Invalid);
        }
        let url = Url::parse(raw).map_err(|_| EndpointError::Invalid)?;
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(EndpointError::Invalid);
        }
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            _ => return Err(EndpointError::Scheme),
        }
        let host = url.host_str().ok_or(EndpointError::Invalid)?;
        let port = url.port_or_known_default().ok_or(EndpointError::Invalid)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| EndpointError::Unresolvable)?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(EndpointError::Unresolvable);
        }
        if !self.allow_private && addrs.iter().any(|a| !is_public(a.ip())) {
            return Err(EndpointError::NotPublic);
        }
        Ok(url)
    }
}

/// Whether `ip` is a public unicast address: not loopback, private
/// (RFC 1918, unique local), link-local, shared (RFC 6598), documentation,
/// benchmarking, multicast, broadcast, unspecified, or an IPv4 address
/// mapped into IPv6 that is any of these.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                || (o[0] == 198 && (o[1] & 0xFE) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00
                || (s[0] & 0xFFC0) == 0xFE80
                || (s[0] == 0x2001 && s[1] == 0x0DB8))
        }
    }
}

/// A `reqwest` DNS resolver that drops every non-public address (and fails
/// when none is left), so a delivery never connects inside the network
/// whatever the name resolves to by then. Literal IP hosts do not pass
/// through a resolver; [`EndpointPolicy::check`] refuses them.
#[derive(Debug, Clone, Copy)]
pub struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_public_https_endpoints_are_accepted() {
        let strict = EndpointPolicy {
            allow_http: false,
            allow_private: false,
        };
        for (url, want) in [
            ("http://93.184.215.14/hook", EndpointError::Scheme),
            ("https://127.0.0.1/hook", EndpointError::NotPublic),
            ("https://10.1.2.3/hook", EndpointError::NotPublic),
            ("https://169.254.169.254/latest", EndpointError::NotPublic),
            ("https://[::1]/hook", EndpointError::NotPublic),
            (
                "https://[::ffff:192.168.0.1]/hook",
                EndpointError::NotPublic,
            ),
            ("https://100.64.0.1/hook", EndpointError::NotPublic),
            ("https://localhost/hook", EndpointError::NotPublic),
            ("https://user:pw@93.184.215.14/hook", EndpointError::Invalid),
            ("not a url", EndpointError::Invalid),
            ("ftp://93.184.215.14/", EndpointError::Scheme),
        ] {
            assert_eq!(strict.check(url).await.map(|_| ()), Err(want), "{url}");
        }
        assert!(strict.check("https://93.184.215.14/hook").await.is_ok());
        let tests = EndpointPolicy {
            allow_http: true,
            allow_private: true,
        };
        assert!(tests.check("http://127.0.0.1:9/hook").await.is_ok());
    }
}
