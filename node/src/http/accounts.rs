//! People's accounts and sessions on the studio's site.
//!
//! `POST /v1/auth/signup` and `POST /v1/auth/login` take `{username, password}` and answer
//! with a session cookie (`sesame_session`: HttpOnly, SameSite=Strict, Secure when the
//! node's public URL is https) and `{"csrf": "..."}`; `POST /v1/auth/logout` ends the
//! session; `GET /v1/auth/session` says who is logged in (and the CSRF token again, for a
//! page that was reloaded).
//!
//! A session acts as a scoped editor token (see [`Caller`]): the person may write their own
//! profile (`profiles/<username>`) and their own assets (`_assets/avatars/<username>…`), and
//! nothing else, through the ordinary API. Every request made with the cookie that is not a
//! read must carry `X-CSRF-Token`; the token is derived from the session's secret (a keyed
//! blake3 hash), so it is never stored and a cross-site page can neither read nor guess it.
//!
//! Passwords are hashed with argon2id (19 MiB, 2 passes) on the blocking pool, at most
//! [`HASHES_CONCURRENT_MAX`] at once; only the PHC string reaches the log. Every login
//! starts a new session with a new random secret (a cookie planted before login is never
//! adopted). Failed logins are limited per name and per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sesame_proto::{Command, CommandResult, Role, Scope};

use crate::app::{now_ms, Node};
use crate::http::auth::{hash_token, Caller};
use crate::http::error::ApiError;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "sesame_session";
/// The header that carries the CSRF token on writes made with the session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
pub const SESSION_TTL_S: u64 = 30 * 24 * 3_600;
/// Password length, in bytes.
pub const PASSWORD_BYTES_MIN: usize = 8;
pub const PASSWORD_BYTES_MAX: usize = 1_024;
/// Password hashes computed at once (each takes 19 MiB and tens of milliseconds).
pub const HASHES_CONCURRENT_MAX: usize = 2;
/// Failed logins allowed per name, and per address, in a window of [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES_PER_NAME_MAX: u32 = 5;
pub const LOGIN_FAILURES_PER_ADDRESS_MAX: u32 = 20;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Names and addresses the login limiter remembers; past it, the oldest windows go.
const LOGIN_LIMITER_ENTRIES_MAX: usize = 100_000;
/// Names that would shadow the node's own paths or mislead visitors.
pub const RESERVED_USERNAMES: &[&str] = &[
    "v1", "healthz", "readyz", "metrics", "static", "admin", "root", "api", "studio", "login",
    "logout", "signup", "settings", "about", "help", "www", "index", "sitemap", "robots", "404",
];

static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HASHES_CONCURRENT_MAX);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize)]
pub struct SessionInfo {
    pub username: String,
    pub site: String,
    pub csrf: String,
    pub expires_at_ms: u64,
}

/// The collection where the studio keeps each person's saved profiles (`<username>/<ms>`).
pub const HISTORY_COLLECTION: &str = "profile_history";

/// What a session may touch: the person's profile, avatar assets and saved versions.
pub fn session_scopes(username: &str) -> Vec<Scope> {
    vec![
        Scope {
            collection: HISTORY_COLLECTION.into(),
            key: format!("{username}/"),
            prefix: true,
        },
        Scope {
            collection: "profiles".into(),
            key: username.to_string(),
            prefix: false,
        },
        Scope {
            collection: "_assets".into(),
            key: format!("avatars/{username}"),
            prefix: true,
        },
    ]
}

/// The CSRF token of a session: derived from its secret, never stored.
pub fn csrf_token(secret: &str) -> String {
    blake3::keyed_hash(
        blake3::hash(secret.as_bytes()).as_bytes(),
        b"sesame csrf token v1",
    )
    .to_hex()
    .to_string()
}

/// The session secret a request's cookie carries.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// The caller a session cookie names, with the CSRF check for anything but a read.
pub async fn session_caller(
    node: &Node,
    method: &http::Method,
    headers: &HeaderMap,
    secret: &str,
) -> Result<Caller, ApiError> {
    let hash = hash_token(secret);
    let session = node.read(move |v| v.session(&hash, now_ms())).await?;
    let Some((site, username, _)) = session else {
        return Err(ApiError::unauthorized(
            "this session ended or expired; log in again",
        ));
    };
    let safe = matches!(*method, http::Method::GET | http::Method::HEAD);
    if !safe {
        let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        let expected = csrf_token(secret);
        if sent.is_none_or(|s| !constant_time_eq(s.as_bytes(), expected.as_bytes())) {
            return Err(ApiError::forbidden(
                "a write made with the session cookie needs the X-CSRF-Token header the login answered",
            ));
        }
    }
    Ok(Caller::Site {
        site,
        role: Role::Editor,
        scopes: session_scopes(&username),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a username: a site-name-shaped word (it becomes the page's URL) and not reserved.
pub fn check_username(username: &str) -> Result<(), ApiError> {
    if sesame_proto::validate_site(username).is_err() {
        return Err(ApiError::bad_request(
            "a username is 1 to 63 lower-case letters, digits and '-', starting with a letter or digit (it becomes your page's address)",
        ));
    }
    if RESERVED_USERNAMES.contains(&username) {
        return Err(ApiError::bad_request(format!(
            "the name {username:?} is reserved; choose another"
        )));
    }
    Ok(())
}

fn check_password(password: &str) -> Result<(), ApiError> {
    if password.len() < PASSWORD_BYTES_MIN || password.len() > PASSWORD_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "a password is {PASSWORD_BYTES_MIN} to {PASSWORD_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn studio_site(node: &Node) -> Result<String, ApiError> {
    node.studio_site.clone().ok_or_else(|| {
        ApiError::not_found("this node has no studio (start it with --studio-site SITE)")
    })
}

async fn hash_password(password: String) -> Result<String, ApiError> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the password hasher is closed"))?;
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| format!("random salt: {e}"))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::internal(format!("hash the password: {e}")))?
    .map_err(|e| ApiError::internal(format!("hash the password: {e}")))
}

async fn verify_password(password: String, phc: String) -> Result<bool, ApiError> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the password hasher is closed"))?;
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&phc).map_err(|e| e.to_string())?;
        Ok::<_, String>(
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("check the password: {e}")))?
    .map_err(|e| ApiError::internal(format!("stored password hash: {e}")))
}

/// Events (failed logins, saves) per key, in fixed windows of [`LOGIN_WINDOW`].
#[derive(Default)]
pub struct WindowLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl WindowLimiter {
    /// Seconds to wait before `key` may try again, if it has failed too often.
    pub fn blocked(&self, key: &str, max: u32) -> Option<u64> {
        let windows = self.windows.lock().expect("login limiter lock poisoned");
        let (start, failures) = windows.get(key)?;
        let left = LOGIN_WINDOW.checked_sub(start.elapsed())?;
        (*failures >= max).then(|| left.as_secs().max(1))
    }

    pub fn count(&self, key: &str) {
        let mut windows = self.windows.lock().expect("login limiter lock poisoned");
        if windows.len() >= LOGIN_LIMITER_ENTRIES_MAX {
            windows.retain(|_, (start, _)| start.elapsed() < LOGIN_WINDOW);
            if windows.len() >= LOGIN_LIMITER_ENTRIES_MAX {
                windows.clear();
            }
        }
        let entry = windows
            .entry(key.to_string())
            .or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= LOGIN_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// Starts a session for `username`: its `Set-Cookie` value and what the person is told.
async fn start_session(
    node: &Node,
    site: String,
    username: String,
) -> Result<(HeaderValue, SessionInfo), ApiError> {
    let secret = crate::http::auth::new_token();
    let now = now_ms();
    let expires_at_ms = now + SESSION_TTL_S * 1_000;
    let (_, result) = node
        .propose(Command::PutSession {
            site: site.clone(),
            username: username.clone(),
            hash: hash_token(&secret),
            created_at_ms: now,
            expires_at_ms,
        })
        .await?;
    match result {
        CommandResult::SessionStored => {}
        CommandResult::UnknownAccount => {
            return Err(ApiError::unauthorized("wrong username or password"))
        }
        other => {
            return Err(ApiError::internal(format!(
                "start a session: unexpected result {other:?}"
            )))
        }
    }
    let secure = if node.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_TTL_S}{secure}"
    ))
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        cookie,
        SessionInfo {
            csrf: csrf_token(&secret),
            username,
            site,
            expires_at_ms,
        },
    ))
}

/// The `Set-Cookie` value that ends the session cookie in the browser.
pub fn cleared_cookie() -> HeaderValue {
    HeaderValue::from_static("sesame_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn session_answer(status: StatusCode, cookie: HeaderValue, info: SessionInfo) -> Response {
    let mut resp = (status, Json(info)).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /v1/auth/signup`.
pub async fn signup(
    State(node): State<Arc<Node>>,
    crate::http::api::JsonBody(req): crate::http::api::JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let (cookie, info) = sign_up(&node, req).await?;
    Ok(session_answer(StatusCode::CREATED, cookie, info))
}

/// Creates an account and its first session.
pub async fn sign_up(
    node: &Node,
    req: Credentials,
) -> Result<(HeaderValue, SessionInfo), ApiError> {
    let site = studio_site(node)?;
    check_username(&req.username)?;
    check_password(&req.password)?;
    // A name is taken by an account, or by a profile someone already has.
    let (name, s) = (req.username.clone(), site.clone());
    let taken = node
        .read(move |v| {
            Ok(v.account(&s, &name)?.is_some() || v.get(&s, "profiles", &name)?.is_some())
        })
        .await?;
    if taken {
        return Err(name_taken(&req.username));
    }
    let password_hash = hash_password(req.password).await?;
    let (_, result) = node
        .propose(Command::PutAccount {
            site: site.clone(),
            username: req.username.clone(),
            password_hash,
            created_at_ms: now_ms(),
        })
        .await?;
    match result {
        CommandResult::AccountCreated => {}
        CommandResult::AccountExists => return Err(name_taken(&req.username)),
        CommandResult::UnknownSite { site } => return Err(ApiError::unknown_site(&site)),
        other => {
            return Err(ApiError::internal(format!(
                "sign up: unexpected result {other:?}"
            )))
        }
    }
    start_session(node, site, req.username).await
}

fn name_taken(username: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "name_taken",
        format!("the name {username:?} is taken; choose another"),
    )
}

/// `POST /v1/auth/login`.
pub async fn login(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    crate::http::api::JsonBody(req): crate::http::api::JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let (cookie, info) = log_in(&node, peer.ip(), req).await?;
    Ok(session_answer(StatusCode::OK, cookie, info))
}

/// Checks a person's password (failures limited per name and address) and starts a
/// new session.
pub async fn log_in(
    node: &Node,
    peer: IpAddr,
    req: Credentials,
) -> Result<(HeaderValue, SessionInfo), ApiError> {
    let site = studio_site(node)?;
    let name_key = format!("name:{}", req.username);
    let address_key = format!("address:{}", address(peer));
    for (key, max) in [
        (&name_key, LOGIN_FAILURES_PER_NAME_MAX),
        (&address_key, LOGIN_FAILURES_PER_ADDRESS_MAX),
    ] {
        if let Some(secs) = node.logins.blocked(key, max) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many failed logins; try again in {secs} s"),
            );
            e.retry_after = Some(secs);
            return Err(e);
        }
    }
    let wrong = || ApiError::unauthorized("wrong username or password");
    if check_username(&req.username).is_err() || check_password(&req.password).is_err() {
        node.logins.count(&name_key);
        node.logins.count(&address_key);
        return Err(wrong());
    }
    let (s, name) = (site.clone(), req.username.clone());
    let stored = node.read(move |v| v.account(&s, &name)).await?;
    // An unknown name costs a hash too, so timing does not tell names apart.
    let phc = match stored {
        Some(phc) => phc,
        None => {
            let _ = hash_password(req.password.clone()).await;
            node.logins.count(&name_key);
            node.logins.count(&address_key);
            return Err(wrong());
        }
    };
    if !verify_password(req.password, phc).await? {
        node.logins.count(&name_key);
        node.logins.count(&address_key);
        return Err(wrong());
    }
    start_session(node, site, req.username).await
}

/// IPv6 addresses are limited per /64, as one host usually holds a whole /64.
fn address(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// `POST /v1/auth/logout`: ends the cookie's session (CSRF-checked) and clears the cookie.
pub async fn logout(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let secret = session_cookie(&headers)
        .ok_or_else(|| ApiError::unauthorized("not logged in"))?
        .to_string();
    session_caller(&node, &http::Method::POST, &headers, &secret).await?;
    end_session(&node, &secret).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, cleared_cookie());
    Ok(resp)
}

/// Ends the session whose secret is `secret`.
pub async fn end_session(node: &Node, secret: &str) -> Result<(), ApiError> {
    node.propose(Command::EndSession {
        hash: hash_token(secret),
        ended_at_ms: now_ms(),
    })
    .await?;
    Ok(())
}

/// `GET /v1/auth/session`: who the cookie's session belongs to, and its CSRF token.
pub async fn session(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let secret = session_cookie(&headers)
        .ok_or_else(|| ApiError::unauthorized("not logged in"))?
        .to_string();
    let hash = hash_token(&secret);
    let found = node.read(move |v| v.session(&hash, now_ms())).await?;
    let (site, username, expires_at_ms) = found
        .ok_or_else(|| ApiError::unauthorized("this session ended or expired; log in again"))?;
    let mut resp = Json(SessionInfo {
        csrf: csrf_token(&secret),
        username,
        site,
        expires_at_ms,
    })
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
