//! What every request passes before its route: the `Host` a loopback server answers to (DNS
//! rebinding), the origin of state-changing requests (no website may queue jobs through a
//! visitor's browser), the length of the URI; and after it, every 4xx in the one JSON shape
//! (`{"error": {...}}`), including those axum and its extractors write as plain text (405, 415,
//! 422, ...).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// The longest URI answered (longer ones: 414).
pub const MAX_URI_BYTES: usize = 8192;

/// Who may call.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The server listens on a loopback address: the `Host` must name loopback too.
    pub loopback: bool,
    /// Origins allowed by `--cors` (`*`: any).
    pub cors: Vec<String>,
}

impl Policy {
    fn allows_origin(&self, origin: &str) -> bool {
        self.cors.iter().any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }
}

/// Whether `host` (a `Host` header: name or address, maybe a port) names this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn forbidden(message: String) -> Response {
    ApiError { code: Some("forbidden"), ..ApiError::new(StatusCode::FORBIDDEN, message) }.into_response()
}

/// Whether a request with these headers comes from a page of another site: by `Sec-Fetch-Site`
/// (browsers send it on every request), else by an `Origin` that is not this server's.
fn cross_site(headers: &HeaderMap, policy: &Policy) -> Option<String> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin = headers.get(header::ORIGIN).map(|v| v.to_str().unwrap_or("?"));
    if let Some(origin) = origin {
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same && !policy.allows_origin(origin) {
            return Some(format!(
                "requests from pages of another origin ({origin}) may not change anything here: \
                 start the server with --cors {origin} to allow that origin"
            ));
        }
        if !same {
            // An origin allowed by --cors: Sec-Fetch-Site says cross-site, as it should.
            return None;
        }
    }
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !site.is_empty() && !["same-origin", "none"].contains(&site.to_ascii_lowercase().as_str()) {
        return Some(format!(
            "requests from other sites (Sec-Fetch-Site: {site}) may not change anything here: \
             use this server's own page, or allow the page's origin with --cors"
        ));
    }
    None
}

/// The checks before the routes, and the JSON shape of every 4xx after them.
pub async fn guard(State(policy): State<Arc<Policy>>, req: Request, next: Next) -> Response {
    if policy.loopback {
        if let Some(host) = req.headers().get(header::HOST) {
            let host = host.to_str().unwrap_or("?");
            if !is_loopback_host(host) {
                return forbidden(format!(
                    "this server listens on a loopback address and answers only to 127.0.0.1, [::1] or localhost, \
                     not to the host `{host}`"
                ));
            }
        }
    }
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return ApiError {
            code: Some("uri_too_long"),
            ..ApiError::new(StatusCode::URI_TOO_LONG, format!("the URI is longer than {MAX_URI_BYTES} bytes"))
        }
        .into_response();
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes {
        if let Some(why) = cross_site(req.headers(), &policy) {
            return forbidden(why);
        }
    }
    let method = req.method().clone();
    let response = next.run(req).await;
    if response.status().is_client_error() && !is_json(response.headers()) {
        return as_json_error(response, &method).await;
    }
    response
}

fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/json"))
}

/// A plain-text (or empty) 4xx rewritten as `{"error": {...}}`, its text the message.
async fn as_json_error(response: Response, method: &Method) -> Response {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let text = match http_body_util::Limited::new(body, 4096).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
            format!("{method} is not allowed on this route (allowed: {allowed})")
        }
        _ if !text.is_empty() => text,
        _ => status.canonical_reason().unwrap_or("bad request").to_string(),
    };
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        _ => "invalid_request",
    };
    let mut out = ApiError { code: Some(code), ..ApiError::new(status, message) }.into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn loopback_hosts() {
        for ok in ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "[::1]", "a.localhost"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80", "10.0.0.1", ""] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn origins() {
        let policy = Policy { loopback: true, cors: vec!["https://app.example".into()] };
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(cross_site(&headers(&[("host", "127.0.0.1:8000")]), &policy).is_none());
        let same = headers(&[("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")]);
        assert!(cross_site(&same, &policy).is_none());
        let evil = headers(&[("host", "127.0.0.1:8000"), ("origin", "http://evil.example")]);
        assert!(cross_site(&evil, &policy).is_some());
        let null = headers(&[("host", "127.0.0.1:8000"), ("origin", "null")]);
        assert!(cross_site(&null, &policy).is_some());
        let fetch = headers(&[("host", "127.0.0.1:8000"), ("sec-fetch-site", "cross-site")]);
        assert!(cross_site(&fetch, &policy).is_some());
        let allowed =
            headers(&[("host", "127.0.0.1:8000"), ("origin", "https://app.example"), ("sec-fetch-site", "cross-site")]);
        assert!(cross_site(&allowed, &policy).is_none());
    }
}
