//! The studio at `/_studio/`: people sign up, log in and edit their own page on the studio's
//! site, in plain HTML forms that work without JavaScript (a small script only polls the
//! publish status). It is a client of the public API's mechanisms: accounts and sessions
//! (`http/accounts.rs`), the ordinary write path with the session's scoped rights, previews
//! (`pages/preview.rs`) and the site's published versions.
//!
//! Forms carry the session's CSRF token in a hidden field (`_csrf`); every answer has a
//! strict Content-Security-Policy (no inline script or style) and is never cached.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use sesame_proto::{CommandResult, Op, Transaction, Value};

use crate::app::{now_ms, Node};
use crate::http::accounts::{self, Credentials};
use crate::http::error::ApiError;

/// The themes a person may pick (classes the platform site's layout styles).
pub const THEMES: &[(&str, &str)] = &[
    ("classic", "Classic"),
    ("midnight", "Midnight"),
    ("paper", "Paper"),
];
/// Most links on a profile.
pub const LINKS_MAX: usize = 10;
/// Longest name and bio, in characters.
pub const NAME_CHARS_MAX: usize = 80;
pub const BIO_CHARS_MAX: usize = 500;
/// Largest form body the studio reads.
const FORM_BYTES_MAX: usize = 64 << 10;

const CSS: &str = include_str!("../static/studio.css");
const JS: &str = include_str!("../static/studio.js");
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/_studio", get(|| async { redirect("/_studio/", None) }))
        .route("/_studio/", get(page))
        .route(
            "/_studio/studio.css",
            get(|| async { asset(CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/_studio/studio.js",
            get(|| async { asset(JS, "text/javascript; charset=utf-8") }),
        )
        .route("/_studio/signup", post(signup))
        .route("/_studio/login", post(login))
        .route("/_studio/logout", post(logout))
        .route("/_studio/save", post(save))
        .route("/_studio/preview", post(preview))
        .route("/_studio/status", get(status))
        .route("/_studio/restore", post(restore))
        .route("/_studio/admin", get(admin_form).post(admin))
        .route("/_studio/export.zip", get(export_zip))
        .route(
            "/_studio/avatar",
            post(avatar).layer(axum::extract::DefaultBodyLimit::max(
                AVATAR_BYTES_MAX + (16 << 10),
            )),
        )
}

/// Refused writes the dashboard remembers.
const REJECTIONS_KEPT: usize = 100;

/// The latest refused writes: `(when, method and path, status)`.
#[derive(Default)]
pub struct Rejections {
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, String, u16)>>,
}

impl Rejections {
    pub fn record(&self, method: &http::Method, path: &str, status: StatusCode) {
        let mut recent = self.recent.lock().expect("rejections lock poisoned");
        if recent.len() >= REJECTIONS_KEPT {
            recent.pop_front();
        }
        recent.push_back((now_ms(), format!("{method} {path}"), status.as_u16()));
    }

    fn newest(&self) -> Vec<(u64, String, u16)> {
        let recent = self.recent.lock().expect("rejections lock poisoned");
        recent.iter().rev().cloned().collect()
    }
}

/// Whether a request writes site data (what the dashboard counts as a refused write).
pub fn is_write_path(method: &http::Method, path: &str) -> bool {
    *method == http::Method::POST
        && ((path.starts_with("/v1/sites/")
            && (path.ends_with("/tx") || path.ends_with("/preview")))
            || matches!(
                path,
                "/_studio/save" | "/_studio/avatar" | "/_studio/restore" | "/_sesame/post"
            ))
}

/// `GET /_studio/admin`: asks for the admin token (it is never stored, not even in a cookie).
async fn admin_form() -> Response {
    html(
        StatusCode::OK,
        "Admin",
        "<h1>Admin dashboard</h1>\n\
         <form method=\"post\" action=\"/_studio/admin\" class=\"card\">\n\
         <label for=\"token\">Admin token</label>\n\
         <input id=\"token\" name=\"token\" type=\"password\" required autocomplete=\"off\">\n\
         <button type=\"submit\">Show the dashboard</button>\n</form>",
    )
}

/// `POST /_studio/admin` with the admin token: people, recent publishes with their times,
/// standing template errors, refused writes.
async fn admin(State(node): State<Arc<Node>>, body: axum::body::Bytes) -> Response {
    let fields = form(&body).unwrap_or_default();
    let token = field(&fields, "token");
    if !node.is_admin_hash(&crate::http::auth::hash_token(token)) {
        return html(
            StatusCode::UNAUTHORIZED,
            "Admin",
            "<h1>Admin dashboard</h1>\n<p class=\"error\" role=\"alert\">That is not the admin token. <a href=\"/_studio/admin\">Try again</a></p>",
        );
    }
    let Some(site) = node.studio_site.clone() else {
        return html(
            StatusCode::NOT_FOUND,
            "Admin",
            "<h1>Admin dashboard</h1>\n<p>This node has no studio site.</p>",
        );
    };
    let name = site.clone();
    let read = node
        .read(move |v| Ok((v.accounts(&name, 200)?, v.versions(&name, 20)?)))
        .await;
    let (people, versions) = match read {
        Ok(r) => r,
        Err(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                "Admin",
                &format!(
                    "<h1>Admin dashboard</h1>\n<p class=\"error\" role=\"alert\">{}</p>",
                    esc(&e.message)
                ),
            )
        }
    };
    let now = now_ms();
    let ago = |at: u64| format!("{} s ago", now.saturating_sub(at) / 1_000);
    let status = node.projections.status(&site).unwrap_or_default();
    let people_rows: String = people
        .iter()
        .map(|(u, at)| {
            format!(
                "<tr><td><a href=\"{}/{}\">{}</a></td><td>{}</td></tr>\n",
                esc(&node.projections.base_url(&site)),
                esc(u),
                esc(u),
                ago(*at)
            )
        })
        .collect();
    let publish_rows: String = versions
        .iter()
        .map(|v| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                v.index,
                ago(v.published_at_ms),
                v.files,
                if v.rollback { "rollback" } else { "publish" }
            )
        })
        .collect();
    let error_rows: String = status
        .errors
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&e.template),
                e.line.map(|l| l.to_string()).unwrap_or_default(),
                esc(&e.message)
            )
        })
        .collect();
    let rejection_rows: String = node
        .rejections
        .newest()
        .iter()
        .map(|(at, what, code)| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{code}</td></tr>\n",
                ago(*at),
                esc(what)
            )
        })
        .collect();
    let last = match (status.last_publish_at, status.last_publish_ms) {
        (Some(at), Some(ms)) => format!(
            "<p>Last publish {}: render and publish took {ms} ms.</p>\n",
            ago(at)
        ),
        _ => String::new(),
    };
    let body = format!(
        "<h1>Admin dashboard: {site}</h1>\n{last}\
         <section aria-labelledby=\"people\"><h2 id=\"people\">People ({n})</h2>\n\
         <table><thead><tr><th scope=\"col\">Username</th><th scope=\"col\">Signed up</th></tr></thead><tbody>\n{people_rows}</tbody></table></section>\n\
         <section aria-labelledby=\"publishes\"><h2 id=\"publishes\">Recent publishes</h2>\n\
         <table><thead><tr><th scope=\"col\">Version</th><th scope=\"col\">When</th><th scope=\"col\">Files</th><th scope=\"col\">Kind</th></tr></thead><tbody>\n{publish_rows}</tbody></table></section>\n\
         <section aria-labelledby=\"errors\"><h2 id=\"errors\">Template errors</h2>\n\
         <table><thead><tr><th scope=\"col\">Template</th><th scope=\"col\">Line</th><th scope=\"col\">Message</th></tr></thead><tbody>\n{error_rows}</tbody></table></section>\n\
         <section aria-labelledby=\"rejections\"><h2 id=\"rejections\">Refused writes</h2>\n\
         <table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Request</th><th scope=\"col\">Status</th></tr></thead><tbody>\n{rejection_rows}</tbody></table></section>",
        site = esc(&site),
        n = people.len(),
    );
    html(StatusCode::OK, "Admin", &body)
}

/// Saves one person may make a minute in the studio.
pub const SAVES_PER_MINUTE_MAX: u32 = 20;

/// Saved versions of a profile the studio keeps per person.
pub const HISTORY_KEEP: usize = 20;
/// Saved versions the editor lists.
const HISTORY_SHOWN: usize = 10;

/// The ops that record `value` as a saved version of `username`'s profile, and forget the
/// oldest past [`HISTORY_KEEP`].
async fn history_ops(node: &Node, site: &str, username: &str, value: &Value) -> Vec<Op> {
    let (s, prefix) = (site.to_string(), format!("{username}/"));
    let kept = node
        .read(move |v| {
            v.scan(
                &s,
                accounts::HISTORY_COLLECTION,
                &prefix,
                None,
                HISTORY_KEEP * 2,
            )
        })
        .await
        .unwrap_or_default();
    let mut ops = vec![Op::Put {
        collection: accounts::HISTORY_COLLECTION.into(),
        key: format!("{username}/{:013}", now_ms()),
        value: value.clone(),
        if_version: None,
    }];
    // Keys sort by time: the oldest come first.
    let drop = (kept.len() + 1).saturating_sub(HISTORY_KEEP);
    for t in kept.into_iter().take(drop) {
        ops.push(Op::Delete {
            collection: accounts::HISTORY_COLLECTION.into(),
            key: t.key,
            if_version: None,
        });
    }
    ops
}

/// The person's saved versions, newest first: `(key, saved at ms, name)`.
async fn history(node: &Node, site: &str, username: &str) -> Vec<(String, u64, String)> {
    let (s, prefix) = (site.to_string(), format!("{username}/"));
    let mut rows: Vec<(String, u64, String)> = node
        .read(move |v| {
            v.scan(
                &s,
                accounts::HISTORY_COLLECTION,
                &prefix,
                None,
                HISTORY_KEEP * 2,
            )
        })
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            let at = t
                .key
                .rsplit('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let name = t.value.to_json()["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (t.key, at, name)
        })
        .collect();
    rows.reverse();
    rows.truncate(HISTORY_SHOWN);
    rows
}

/// `POST /_studio/restore`: saves an earlier version of the person's profile again, as a
/// new save through the ordinary write path (their rights, the save limit, one
/// transaction); the version they had stays in the history.
async fn restore(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fields = form(&body).unwrap_or_default();
    let (secret, username, site) = match form_session(&node, &headers, &fields).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let key = field(&fields, "key").to_string();
    if !key.starts_with(&format!("{username}/")) {
        return html(
            StatusCode::FORBIDDEN,
            "Refused",
            "<h1>Refused</h1>\n<p class=\"error\" role=\"alert\">That version is not yours. <a href=\"/_studio/\">Back to the studio</a></p>",
        );
    }
    let (s, k) = (site.clone(), key.clone());
    let Some(old) = node
        .read(move |v| v.get(&s, accounts::HISTORY_COLLECTION, &k))
        .await
        .ok()
        .flatten()
    else {
        let msg = "Not restored: that version is no longer kept.".to_string();
        return editor(
            &node,
            &secret,
            &username,
            &site,
            None,
            Some((&msg, Profile::default())),
        )
        .await;
    };
    // Pictures have no history (a new upload replaces the asset), so the page keeps the
    // picture it has now, as a save from the form does.
    let (s, k) = (site.clone(), username.clone());
    let current_avatar = node
        .read(move |v| v.get(&s, "profiles", &k))
        .await
        .ok()
        .flatten()
        .and_then(|t| t.value.to_json()["avatar"].as_str().map(str::to_string));
    let mut restored = old.value.to_json();
    let profile = Profile::from_value(&restored);
    match (restored.as_object_mut(), current_avatar) {
        (Some(fields), Some(avatar)) => {
            fields.insert("avatar".into(), serde_json::Value::String(avatar));
        }
        (Some(fields), None) => {
            fields.remove("avatar");
        }
        (None, _) => {}
    }
    let value = match Value::from_json(restored) {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("Not restored: {e}");
            return editor(
                &node,
                &secret,
                &username,
                &site,
                None,
                Some((&msg, profile)),
            )
            .await;
        }
    };
    let mut ops = vec![Op::Put {
        collection: "profiles".into(),
        key: username.clone(),
        value: value.clone(),
        if_version: None,
    }];
    ops.extend(history_ops(&node, &site, &username, &value).await);
    commit(&node, &secret, &username, &site, ops, profile).await
}

/// How long ago `at_ms` was, for people: "12 s", "5 min", "3 h", "2 days".
fn ago(at_ms: u64) -> String {
    let secs = now_ms().saturating_sub(at_ms) / 1_000;
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3_599 => format!("{} min", secs / 60),
        3_600..=86_399 => format!("{} h", secs / 3_600),
        86_400..=172_799 => "1 day".to_string(),
        _ => format!("{} days", secs / 86_400),
    }
}

/// `GET /_studio/export.zip`: the person's page, its stylesheet and their pictures, as the
/// site serves them now, ready for any static host.
async fn export_zip(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let Some((_, username, site)) = who(&node, &headers).await else {
        return redirect("/_studio/", None);
    };
    let Some(manifest) = node.pages.manifest(&site) else {
        return ApiError::not_found("nothing is published yet").into_response();
    };
    // The person's files, looked up by path (the site may hold a million others).
    let avatars = AVATAR_EXTENSIONS
        .iter()
        .map(|ext| format!("/avatars/{username}.{ext}"));
    let paths = [format!("/{username}"), "/style.css".to_string()];
    let mut own = (*manifest).clone();
    own.files = paths
        .into_iter()
        .chain(avatars)
        .filter_map(|p| Some((p.clone(), manifest.files.get(&p)?.clone())))
        .collect();
    if !own.files.contains_key(&format!("/{username}")) {
        return ApiError::not_found("your page is not published yet; save it first")
            .into_response();
    }
    let base_url = node.projections.base_url(&site);
    match crate::pages::export::site_zip(&node.pages, &own, &base_url).await {
        Ok(zip) => (
            [
                (header::CONTENT_TYPE, "application/zip".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{username}.zip\""),
                ),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
            zip,
        )
            .into_response(),
        Err(e) => ApiError::unavailable(format!("{e:#}")).into_response(),
    }
}

/// Largest avatar image.
pub const AVATAR_BYTES_MAX: usize = 512 << 10;

/// The file extensions of the image formats an avatar may be (see [`image_kind`]).
const AVATAR_EXTENSIONS: [&str; 3] = ["png", "jpg", "webp"];

/// The image formats an avatar may be, told by their first bytes (never by the name or the
/// declared type): the file extension it is stored under.
fn image_kind(bytes: &[u8]) -> Option<&'static str> {
    let [png, jpg, webp] = AVATAR_EXTENSIONS;
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(jpg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(webp)
    } else {
        None
    }
}

/// `POST /_studio/avatar` (multipart): stores the image as the person's avatar asset and
/// points their profile at it, in one transaction.
async fn avatar(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    mut multipart: axum::extract::Multipart,
) -> Response {
    let mut csrf = String::new();
    let mut image: Option<Vec<u8>> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return html(
                    StatusCode::BAD_REQUEST,
                    "Refused",
                    &format!(
                        "<h1>Not uploaded</h1>\n<p class=\"error\" role=\"alert\">The upload could not be read ({}); images are at most {} KiB. <a href=\"/_studio/\">Back to the studio</a></p>",
                        esc(&e.body_text()),
                        AVATAR_BYTES_MAX >> 10
                    ),
                )
            }
        };
        match field.name() {
            Some("_csrf") => csrf = field.text().await.unwrap_or_default(),
            Some("avatar") => match field.bytes().await {
                Ok(b) => image = Some(b.to_vec()),
                Err(e) => {
                    return html(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Refused",
                        &format!(
                            "<h1>Not uploaded</h1>\n<p class=\"error\" role=\"alert\">{}; images are at most {} KiB. <a href=\"/_studio/\">Back to the studio</a></p>",
                            esc(&e.body_text()),
                            AVATAR_BYTES_MAX >> 10
                        ),
                    )
                }
            },
            _ => {}
        }
    }
    let fields = vec![("_csrf".to_string(), csrf)];
    let (secret, username, site) = match form_session(&node, &headers, &fields).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let (s, k) = (site.clone(), username.clone());
    let stored = node
        .read(move |v| v.get(&s, "profiles", &k))
        .await
        .ok()
        .flatten();
    let mut profile = stored
        .as_ref()
        .map(|t| t.value.to_json())
        .unwrap_or_else(|| serde_json::json!({"name": username, "theme": "classic"}));
    let fail = |msg: String, profile: &serde_json::Value| (msg, Profile::from_value(profile));
    let image = match image {
        Some(i) if !i.is_empty() => i,
        _ => {
            let (m, p) = fail("Not uploaded: choose an image first.".into(), &profile);
            return editor(&node, &secret, &username, &site, None, Some((&m, p))).await;
        }
    };
    if image.len() > AVATAR_BYTES_MAX {
        let (m, p) = fail(
            format!(
                "Not uploaded: the image is {} KiB; the limit is {} KiB.",
                image.len() >> 10,
                AVATAR_BYTES_MAX >> 10
            ),
            &profile,
        );
        return editor(&node, &secret, &username, &site, None, Some((&m, p))).await;
    }
    let Some(ext) = image_kind(&image) else {
        let (m, p) = fail(
            "Not uploaded: an avatar is a PNG, JPEG or WebP image.".into(),
            &profile,
        );
        return editor(&node, &secret, &username, &site, None, Some((&m, p))).await;
    };
    let key = format!("avatars/{username}.{ext}");
    let mut ops = Vec::new();
    if let Some(old) = profile["avatar"].as_str().filter(|old| *old != key) {
        ops.push(Op::Delete {
            collection: "_assets".into(),
            key: old.to_string(),
            if_version: None,
        });
    }
    ops.push(Op::Put {
        collection: "_assets".into(),
        key: key.clone(),
        value: Value::Bytes(image),
        if_version: None,
    });
    profile["avatar"] = serde_json::Value::String(key);
    let value = match Value::from_json(profile.clone()) {
        Ok(v) => v,
        Err(e) => {
            let (m, p) = fail(format!("Not uploaded: {e}"), &profile);
            return editor(&node, &secret, &username, &site, None, Some((&m, p))).await;
        }
    };
    ops.push(Op::Put {
        collection: "profiles".into(),
        key: username.clone(),
        value,
        if_version: None,
    });
    commit(
        &node,
        &secret,
        &username,
        &site,
        ops,
        Profile::from_value(&profile),
    )
    .await
}

/// Commits a person's ops through the ordinary write path, with their session's rights and
/// the site's write limit; back to the studio with the commit index, or the form again with
/// what went wrong.
async fn commit(
    node: &Node,
    secret: &str,
    username: &str,
    site: &str,
    ops: Vec<Op>,
    profile: Profile,
) -> Response {
    let caller = crate::http::auth::Caller::Site {
        site: site.to_string(),
        role: sesame_proto::Role::Editor,
        scopes: accounts::session_scopes(username),
    };
    if let Err(e) = caller.require_ops(site, &ops) {
        return editor(
            node,
            secret,
            username,
            site,
            None,
            Some((&e.message, profile)),
        )
        .await;
    }
    let person = format!("{site}/{username}");
    if let Some(secs) = node.saves.blocked(&person, SAVES_PER_MINUTE_MAX) {
        let msg = format!(
            "Not saved: you saved {SAVES_PER_MINUTE_MAX} times in the last minute; you can save again in {secs} s."
        );
        return editor(node, secret, username, site, None, Some((&msg, profile))).await;
    }
    node.saves.count(&person);
    if let Err(wait) = node.limiter.check(site, std::time::Instant::now()) {
        let msg = format!(
            "Not saved: the site is busy; you can save again in {} s.",
            wait.as_secs().max(1)
        );
        return editor(node, secret, username, site, None, Some((&msg, profile))).await;
    }
    let tx = Transaction {
        site: site.to_string(),
        ops,
        origin: None,
    };
    if let Err(e) = tx.validate() {
        let msg = format!("Not saved: {e}");
        return editor(node, secret, username, site, None, Some((&msg, profile))).await;
    }
    match node.write_tx(tx).await {
        Ok((_, CommandResult::Committed { index })) => {
            redirect(&format!("/_studio/?saved={index}"), None)
        }
        Ok((_, other)) => {
            let msg = format!("Not saved: {other:?}");
            editor(node, secret, username, site, None, Some((&msg, profile))).await
        }
        Err(e) => {
            let msg = format!("Not saved: {}", ApiError::from(e).message);
            editor(node, secret, username, site, None, Some((&msg, profile))).await
        }
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let doc = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"description\" content=\"Edit your page: your name, bio, links and theme.\">\n\
         <title>{} · Sesame studio</title>\n<link rel=\"icon\" href=\"data:,\">\n<link rel=\"stylesheet\" href=\"/_studio/studio.css\">\n\
         <script src=\"/_studio/studio.js\" defer></script>\n</head>\n<body>\n\
         <header><p class=\"brand\">Sesame studio</p></header>\n<main id=\"main\">\n{body}\n</main>\n</body>\n</html>\n",
        esc(title)
    );
    let mut resp = (status, doc).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn redirect(to: &str, cookie: Option<HeaderValue>) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The person logged in with this request's cookie: `(secret, username, site)`.
async fn who(node: &Node, headers: &HeaderMap) -> Option<(String, String, String)> {
    let secret = accounts::session_cookie(headers)?.to_string();
    let hash = crate::http::auth::hash_token(&secret);
    let (site, username, _) = node
        .read(move |v| v.session(&hash, now_ms()))
        .await
        .ok()
        .flatten()?;
    Some((secret, username, site))
}

#[derive(Debug, Deserialize, Default)]
struct PageParams {
    saved: Option<u64>,
}

async fn page(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(params): Query<PageParams>,
) -> Response {
    match who(&node, &headers).await {
        None => welcome(StatusCode::OK, None),
        Some((secret, username, site)) => {
            editor(&node, &secret, &username, &site, params.saved, None).await
        }
    }
}

/// Sign-up and log-in forms, with an error message when one failed.
fn welcome(status: StatusCode, error: Option<&str>) -> Response {
    let alert = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>\n", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Your page, in a minute</h1>\n{alert}\
         <div class=\"forms\">\n\
         <form method=\"post\" action=\"/_studio/signup\" class=\"card\">\n<h2>Sign up</h2>\n\
         <label for=\"su-name\">Username <span class=\"hint\">(your page's address)</span></label>\n\
         <input id=\"su-name\" name=\"username\" required pattern=\"[a-z0-9][a-z0-9-]{{0,62}}\" autocomplete=\"username\" autocapitalize=\"none\">\n\
         <label for=\"su-pass\">Password <span class=\"hint\">(8 characters or more)</span></label>\n\
         <input id=\"su-pass\" name=\"password\" type=\"password\" required minlength=\"8\" autocomplete=\"new-password\">\n\
         <button type=\"submit\">Create my page</button>\n</form>\n\
         <form method=\"post\" action=\"/_studio/login\" class=\"card\">\n<h2>Log in</h2>\n\
         <label for=\"li-name\">Username</label>\n\
         <input id=\"li-name\" name=\"username\" required autocomplete=\"username\" autocapitalize=\"none\">\n\
         <label for=\"li-pass\">Password</label>\n\
         <input id=\"li-pass\" name=\"password\" type=\"password\" required autocomplete=\"current-password\">\n\
         <button type=\"submit\">Log in</button>\n</form>\n</div>"
    );
    html(status, "Welcome", &body)
}

/// The profile as the form edits it.
#[derive(Debug, Default, Clone)]
struct Profile {
    name: String,
    bio: String,
    links: Vec<(String, String)>,
    theme: String,
}

impl Profile {
    fn from_value(v: &serde_json::Value) -> Profile {
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Profile {
            name: text("name"),
            bio: text("bio"),
            links: v["links"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|l| {
                            (
                                l["title"].as_str().unwrap_or_default().to_string(),
                                l["url"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            theme: text("theme"),
        }
    }

    fn to_value(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "bio": self.bio,
            "links": self.links.iter().map(|(t, u)| serde_json::json!({"title": t, "url": u})).collect::<Vec<_>>(),
            "theme": self.theme,
        })
    }

    /// The links as the textarea shows them: `title url` per line.
    fn links_text(&self) -> String {
        self.links
            .iter()
            .map(|(t, u)| format!("{t} {u}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The editing page: the form, the publish status, and the links to the public page.
async fn editor(
    node: &Node,
    secret: &str,
    username: &str,
    site: &str,
    saved: Option<u64>,
    error: Option<(&str, Profile)>,
) -> Response {
    let (s, k) = (site.to_string(), username.to_string());
    let stored = node
        .read(move |v| v.get(&s, "profiles", &k))
        .await
        .ok()
        .flatten();
    let (profile, version) = match (&error, stored) {
        (Some((_, p)), t) => (p.clone(), t.map(|t| t.version).unwrap_or(0)),
        (None, Some(t)) => (Profile::from_value(&t.value.to_json()), t.version),
        (None, None) => (
            Profile {
                name: username.to_string(),
                theme: "classic".into(),
                ..Profile::default()
            },
            0,
        ),
    };
    let csrf = accounts::csrf_token(secret);
    let public = format!("{}/", node.projections.base_url(site).trim_end_matches('/'));
    let page_url = format!("{public}{}", esc(username));
    let waiting_for = saved.unwrap_or(version);
    let status = status_text(node, site, waiting_for).await;
    let alert = match &error {
        Some((e, _)) => format!("<p class=\"error\" role=\"alert\">{}</p>\n", esc(e)),
        None => String::new(),
    };
    let themes: String = THEMES
        .iter()
        .map(|(id, label)| {
            let checked = if profile.theme == *id || (profile.theme.is_empty() && *id == "classic") {
                " checked"
            } else {
                ""
            };
            format!(
                "<label class=\"theme\"><input type=\"radio\" name=\"theme\" value=\"{id}\"{checked}> {label}</label>\n"
            )
        })
        .collect();
    let saved_versions: String = history(node, site, username)
        .await
        .into_iter()
        .map(|(key, at, name)| {
            format!(
                "<li><form method=\"post\" action=\"/_studio/restore\">\
                 <input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"key\" value=\"{key}\">\
                 <span>{name}, saved {ago} ago</span> \
                 <button type=\"submit\" class=\"link\" aria-describedby=\"history-help\">Restore this version</button></form></li>\n",
                key = esc(&key),
                name = esc(&name),
                ago = ago(at),
            )
        })
        .collect();
    let history_section = if saved_versions.is_empty() {
        String::new()
    } else {
        format!(
            "<section aria-labelledby=\"history-title\">\n<h2 id=\"history-title\">Earlier versions</h2>\n\
             <p class=\"hint\" id=\"history-help\">Your latest saves, newest first. \
             Restoring one saves its name, bio, links and theme as your page again, as pressing Save \
             does: your public page changes back once it is published, your picture stays as it is, \
             and the restore is added to this list, so you can go forward again.</p>\n\
             <ul class=\"history\">\n{saved_versions}</ul>\n</section>\n"
        )
    };
    let body = format!(
        "<h1>Hello, {user}</h1>\n\
         <p>Your page: <a href=\"{page_url}\">{page_url}</a> · <a href=\"/_studio/export.zip\">Download it as a ZIP</a></p>\n\
         <p class=\"status\" id=\"status\" role=\"status\" aria-live=\"polite\" data-index=\"{waiting_for}\">{status}</p>\n\
         {alert}\
         <form method=\"post\" action=\"/_studio/save\" class=\"card\">\n\
         <input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\n\
         <label for=\"name\">Name</label>\n\
         <input id=\"name\" name=\"name\" required maxlength=\"{NAME_CHARS_MAX}\" value=\"{name}\">\n\
         <label for=\"bio\">Bio</label>\n\
         <textarea id=\"bio\" name=\"bio\" rows=\"4\" maxlength=\"{BIO_CHARS_MAX}\">{bio}</textarea>\n\
         <label for=\"links\">Links <span class=\"hint\">(one per line: a title, a space, then the address)</span></label>\n\
         <textarea id=\"links\" name=\"links\" rows=\"4\">{links}</textarea>\n\
         <fieldset>\n<legend>Theme</legend>\n{themes}</fieldset>\n\
         <div class=\"actions\">\n<button type=\"submit\">Save</button>\n\
         <button type=\"submit\" formaction=\"/_studio/preview\" formtarget=\"_blank\" class=\"secondary\">Preview</button>\n</div>\n\
         </form>\n\
         <form method=\"post\" action=\"/_studio/avatar\" enctype=\"multipart/form-data\" class=\"card\">\n\
         <input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\n\
         <label for=\"avatar\">Picture <span class=\"hint\">(PNG, JPEG or WebP, up to 512 KiB)</span></label>\n\
         <input id=\"avatar\" name=\"avatar\" type=\"file\" accept=\"image/png,image/jpeg,image/webp\" required>\n\
         <div class=\"actions\"><button type=\"submit\">Upload picture</button></div>\n</form>\n\
         {history_section}\
         <form method=\"post\" action=\"/_studio/logout\" class=\"logout\">\n\
         <input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\n<button type=\"submit\" class=\"link\">Log out</button>\n</form>",
        user = esc(username),
        name = esc(&profile.name),
        bio = esc(&profile.bio),
        links = esc(&profile.links_text()),
    );
    html(
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        "Your page",
        &body,
    )
}

/// "Your site will update shortly" until the served version reflects `index`, then
/// "Published N seconds ago, version V" (the commit index and the root's publish time).
async fn status_text(node: &Node, site: &str, index: u64) -> String {
    let (published, version, at) = publish_state(node, site, index).await;
    if index == 0 {
        return "Fill in your page and save it.".into();
    }
    if !published {
        return "Your site will update shortly.".into();
    }
    let secs = now_ms().saturating_sub(at) / 1_000;
    format!("Published {secs} seconds ago, version {version}.")
}

/// Whether the version this node serves reflects `index`, that version, and when its root
/// was published.
async fn publish_state(node: &Node, site: &str, index: u64) -> (bool, u64, u64) {
    let served = node.pages.served_index(site).unwrap_or(0);
    let name = site.to_string();
    let at = node
        .read(move |v| v.root(&name))
        .await
        .ok()
        .flatten()
        .map(|r| r.published_at_ms)
        .unwrap_or(0);
    (served >= index, served, at)
}

#[derive(Debug, Deserialize)]
struct StatusParams {
    index: u64,
}

/// `GET /_studio/status?index=N`: the publish status as JSON, for the page's script.
async fn status(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(p): Query<StatusParams>,
) -> Response {
    let Some((_, _, site)) = who(&node, &headers).await else {
        return ApiError::unauthorized("not logged in").into_response();
    };
    let (published, version, _) = publish_state(&node, &site, p.index).await;
    let text = status_text(&node, &site, p.index).await;
    let mut resp = axum::Json(serde_json::json!({
        "published": published, "version": version, "text": text
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Reads a urlencoded form body, bounded.
fn form(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    if body.len() > FORM_BYTES_MAX {
        return Err(ApiError::too_large(format!(
            "the form is {} bytes, the limit is {FORM_BYTES_MAX}",
            body.len()
        )));
    }
    Ok(form_urlencoded::parse(body).into_owned().collect())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

async fn signup(State(node): State<Arc<Node>>, body: axum::body::Bytes) -> Response {
    let fields = match form(&body) {
        Ok(f) => f,
        Err(e) => return welcome(StatusCode::BAD_REQUEST, Some(&e.message)),
    };
    let req = Credentials {
        username: field(&fields, "username").to_string(),
        password: field(&fields, "password").to_string(),
    };
    match accounts::sign_up(&node, req).await {
        Ok((cookie, _)) => redirect("/_studio/", Some(cookie)),
        Err(e) => welcome(status_of(&e), Some(&e.message)),
    }
}

async fn login(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    let fields = match form(&body) {
        Ok(f) => f,
        Err(e) => return welcome(StatusCode::BAD_REQUEST, Some(&e.message)),
    };
    let req = Credentials {
        username: field(&fields, "username").to_string(),
        password: field(&fields, "password").to_string(),
    };
    match accounts::log_in(&node, peer.ip(), req).await {
        Ok((cookie, _)) => redirect("/_studio/", Some(cookie)),
        Err(e) => welcome(status_of(&e), Some(&e.message)),
    }
}

fn status_of(e: &ApiError) -> StatusCode {
    e.status
}

/// The logged-in person of a form post, after its CSRF field is checked.
async fn form_session(
    node: &Node,
    headers: &HeaderMap,
    fields: &[(String, String)],
) -> Result<(String, String, String), Response> {
    let Some((secret, username, site)) = who(node, headers).await else {
        return Err(welcome(
            StatusCode::UNAUTHORIZED,
            Some("Your session ended; log in again."),
        ));
    };
    if field(fields, "_csrf") != accounts::csrf_token(&secret) {
        return Err(html(
            StatusCode::FORBIDDEN,
            "Refused",
            "<h1>Refused</h1>\n<p class=\"error\" role=\"alert\">This form did not come from your studio page (its CSRF token is missing or wrong). <a href=\"/_studio/\">Back to the studio</a></p>",
        ));
    }
    Ok((secret, username, site))
}

async fn logout(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fields = form(&body).unwrap_or_default();
    let (secret, _, _) = match form_session(&node, &headers, &fields).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let _ = accounts::end_session(&node, &secret).await;
    redirect("/_studio/", Some(accounts::cleared_cookie()))
}

/// The profile a form describes, checked.
fn profile_from(fields: &[(String, String)]) -> Result<Profile, (String, Profile)> {
    let mut p = Profile {
        name: field(fields, "name").trim().to_string(),
        bio: field(fields, "bio").trim().to_string(),
        links: Vec::new(),
        theme: field(fields, "theme").to_string(),
    };
    let mut problems = Vec::new();
    for line in field(fields, "links")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let (title, url) = match line.rsplit_once(' ') {
            Some((t, u)) => (t.trim().to_string(), u.trim().to_string()),
            None => (line.to_string(), line.to_string()),
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            problems.push(format!(
                "the link {line:?} needs an address starting with https://"
            ));
        }
        p.links.push((title, url));
    }
    if p.name.is_empty() || p.name.chars().count() > NAME_CHARS_MAX {
        problems.push(format!("a name is 1 to {NAME_CHARS_MAX} characters"));
    }
    if p.bio.chars().count() > BIO_CHARS_MAX {
        problems.push(format!("a bio is at most {BIO_CHARS_MAX} characters"));
    }
    if p.links.len() > LINKS_MAX {
        problems.push(format!("at most {LINKS_MAX} links"));
    }
    if !THEMES.iter().any(|(id, _)| *id == p.theme) {
        p.theme = "classic".into();
    }
    if problems.is_empty() {
        Ok(p)
    } else {
        Err((format!("Not saved: {}.", problems.join("; ")), p))
    }
}

/// A profile edit a form describes, checked, for the logged-in person who sent it: the put
/// of their profile (keeping the picture it has), or the answer that says what is wrong.
struct Edit {
    secret: String,
    username: String,
    site: String,
    profile: Profile,
    put: Op,
}

async fn edit_from_form(node: &Node, headers: &HeaderMap, body: &[u8]) -> Result<Edit, Response> {
    let fields =
        form(body).map_err(|e| welcome(StatusCode::PAYLOAD_TOO_LARGE, Some(&e.message)))?;
    let (secret, username, site) = form_session(node, headers, &fields).await?;
    let profile = match profile_from(&fields) {
        Ok(p) => p,
        Err((e, p)) => {
            return Err(editor(node, &secret, &username, &site, None, Some((&e, p))).await)
        }
    };
    let mut value = profile.to_value();
    let (s, k) = (site.clone(), username.clone());
    let stored = node
        .read(move |v| v.get(&s, "profiles", &k))
        .await
        .ok()
        .flatten();
    if let Some(avatar) =
        stored.and_then(|t| t.value.to_json()["avatar"].as_str().map(str::to_string))
    {
        value["avatar"] = serde_json::Value::String(avatar);
    }
    let put = match Value::from_json(value) {
        Ok(value) => Op::Put {
            collection: "profiles".into(),
            key: username.clone(),
            value,
            if_version: None,
        },
        Err(e) => {
            return Err(editor(node, &secret, &username, &site, None, Some((&e, profile))).await)
        }
    };
    Ok(Edit {
        secret,
        username,
        site,
        profile,
        put,
    })
}

async fn save(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let edit = match edit_from_form(&node, &headers, &body).await {
        Ok(e) => e,
        Err(resp) => return resp,
    };
    let mut ops = Vec::new();
    if let Op::Put { value, .. } = &edit.put {
        ops.extend(history_ops(&node, &edit.site, &edit.username, value).await);
    }
    ops.insert(0, edit.put);
    commit(
        &node,
        &edit.secret,
        &edit.username,
        &edit.site,
        ops,
        edit.profile,
    )
    .await
}

async fn preview(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let edit = match edit_from_form(&node, &headers, &body).await {
        Ok(e) => e,
        Err(resp) => return resp,
    };
    match node
        .projections
        .preview(
            &edit.site,
            vec![edit.put],
            std::time::Duration::from_secs(600),
        )
        .await
    {
        Ok(built) => redirect(&format!("{}{}", built.url, edit.username), None),
        Err(e) => {
            let msg = format!("The preview failed: {e:#}");
            editor(
                &node,
                &edit.secret,
                &edit.username,
                &edit.site,
                None,
                Some((&msg, edit.profile)),
            )
            .await
        }
    }
}
