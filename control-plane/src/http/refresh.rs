//! Pausing the dashboard's auto-refresh (WCAG 2.2.1, "Timing Adjustable").
//!
//! The live pages reload themselves with `<meta http-equiv="refresh">` (fleet and jobs every
//! 10 s, an agent and the rollouts every 15 s, an unfinished job every 3 s): without JavaScript
//! that is the only way for them to stay current. A reload also throws away what a user is
//! typing into a filter and moves a screen reader back to the top, so every such page carries a
//! "Pause auto-refresh" link. It goes to `GET /refresh?auto=off&back=<the page>`, which sets the
//! [`REFRESH_COOKIE`] preference (`off`, one year, Path=/, HttpOnly, SameSite=Lax, Secure under
//! TLS) and sends the browser back with a 303; `auto=on` removes it. The preference is per
//! browser, not per user, and holds nothing secret, so the link is a plain GET without CSRF
//! token: the worst a forged one can do is pause someone's reloads.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use serde::Deserialize;

use super::auth::{removal_cookie, Session};
use super::{AppError, HttpState, PageError};

/// Name of the cookie that pauses the auto-refresh of the live pages (value `off`).
pub const REFRESH_COOKIE: &str = "gaffer_refresh";

/// Longest accepted `back` (path and query), bytes; a longer one goes back to `/`.
const BACK_BYTES_MAX: usize = 2048;

/// How long the preference lasts: one year.
const REFRESH_COOKIE_MAX_AGE_DAYS: i64 = 365;

/// Whether the browser of `headers` wants the live pages to reload themselves (true unless its
/// [`REFRESH_COOKIE`] says `off`).
pub(crate) fn auto_refresh(headers: &HeaderMap) -> bool {
    CookieJar::from_headers(headers).get(REFRESH_COOKIE).is_none_or(|c| c.value() != "off")
}

/// The link that flips the preference on the page at `here` (path and query): to pause it when
/// `auto_refresh`, to resume it otherwise.
pub(crate) fn toggle_url(here: &str, auto_refresh: bool) -> String {
    let back = if safe_back(here) { here } else { "/" };
    let query = serde_urlencoded::to_string([("auto", if auto_refresh { "off" } else { "on" }), ("back", back)])
        .unwrap_or_else(|_| "auto=off".into());
    format!("/refresh?{query}")
}

/// `back` is a path of this dashboard: one leading `/`, not `//` or `/\` (which browsers read as
/// another host), printable ASCII only, at most [`BACK_BYTES_MAX`] bytes.
fn safe_back(back: &str) -> bool {
    back.len() <= BACK_BYTES_MAX
        && back.starts_with('/')
        && !back.starts_with("//")
        && !back.starts_with("/\\")
        && back.bytes().all(|b| b.is_ascii_graphic())
}

/// `GET /refresh` query.
#[derive(Debug, Deserialize)]
pub(crate) struct RefreshQuery {
    /// `on` or `off`.
    auto: String,
    /// The page to go back to (path and query); `/` when missing or not a path of this dashboard.
    #[serde(default)]
    back: Option<String>,
}

/// `GET /refresh?auto=on|off&back=PATH`: sets or clears the preference and goes back (303).
///
/// # Errors
/// 400 for an `auto` other than `on` or `off`.
pub(crate) async fn set_refresh(
    _session: Session,
    State(state): State<HttpState>,
    jar: CookieJar,
    query: Result<Query<RefreshQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PageError> {
    let Query(query) = query.map_err(|e| PageError(AppError::BadRequest(e.body_text())))?;
    let back = query.back.as_deref().filter(|b| safe_back(b)).unwrap_or("/").to_owned();
    let jar = match query.auto.as_str() {
        "off" => jar.add(
            Cookie::build((REFRESH_COOKIE, "off"))
                .path("/")
                .http_only(true)
                .same_site(SameSite::Lax)
                .secure(state.security.tls)
                .max_age(time::Duration::days(REFRESH_COOKIE_MAX_AGE_DAYS))
                .build(),
        ),
        "on" => jar.add(removal_cookie(&state.security, REFRESH_COOKIE, "/")),
        other => {
            return Err(PageError(AppError::BadRequest(format!("auto must be on or off, not {other:?}"))));
        }
    };
    Ok((jar, Redirect::to(&back)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_stays_on_this_dashboard() {
        assert!(safe_back("/jobs?state=queued&after=5"));
        for foreign in ["https://evil.example/", "//evil.example/", "/\\evil.example", "jobs", "", "/a b", "/\u{e9}"] {
            assert!(!safe_back(foreign), "{foreign:?} accepted");
        }
        assert!(!safe_back(&format!("/{}", "a".repeat(BACK_BYTES_MAX))));
    }

    #[test]
    fn the_toggle_link_flips_the_preference_and_keeps_the_page() {
        assert_eq!(toggle_url("/jobs?state=queued", true), "/refresh?auto=off&back=%2Fjobs%3Fstate%3Dqueued");
        assert_eq!(toggle_url("/", false), "/refresh?auto=on&back=%2F");
        assert_eq!(toggle_url("//evil.example", true), "/refresh?auto=off&back=%2F");
    }

    #[test]
    fn only_off_pauses() {
        let headers = |cookie: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::COOKIE, cookie.parse().unwrap_or_else(|_| unreachable!()));
            h
        };
        assert!(auto_refresh(&HeaderMap::new()));
        assert!(!auto_refresh(&headers("gaffer_session=x; gaffer_refresh=off")));
        assert!(auto_refresh(&headers("gaffer_refresh=on")));
    }
}
