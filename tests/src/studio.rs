//! The studio over plain HTTP, for tests that need a person before they start.

use reqwest::header::{COOKIE, SET_COOKIE};

/// Signs `username` up through the studio's form; returns the session cookie
/// (`name=value`) and the CSRF field of the editor page.
pub async fn http_sign_up(url: &str, username: &str) -> (String, String) {
    let client = no_redirects();
    let r = client
        .post(format!("{url}/_studio/signup"))
        .form(&[
            ("username", username),
            ("password", "correct horse battery"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = client
        .get(format!("{url}/_studio/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"_csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    (cookie, csrf)
}

/// Posts a studio form (`path` under `url`, say `/_studio/save`) as the person whose session
/// cookie is `cookie`; the CSRF field is one of `fields`. Redirects are not followed: a form
/// that was taken answers 303.
pub async fn http_post_form(
    url: &str,
    path: &str,
    cookie: &str,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    no_redirects()
        .post(format!("{url}{path}"))
        .header(COOKIE, cookie)
        .form(fields)
        .send()
        .await
        .unwrap()
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}
