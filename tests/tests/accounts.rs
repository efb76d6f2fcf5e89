//! Accounts and sessions on the studio's site against a real node: sign up, log in and out,
//! a session edits its own profile and nothing else, CSRF and session fixation attempts
//! fail, failed logins are limited.

use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{json, Value};
use sesame_node::pages::bundle;
use sesame_proto::api::TxRequest;
use sesame_tests::TestNode;

const SITE: &str = "demo";

struct Session {
    cookie: String,
    csrf: String,
}

async fn auth(
    url: &str,
    what: &str,
    username: &str,
    password: &str,
) -> (u16, Value, Option<Session>) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/auth/{what}"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cookie = r
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = r.json().await.unwrap();
    let session = cookie.map(|c| {
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        Session {
            cookie: c.split(';').next().unwrap().to_string(),
            csrf: body["csrf"].as_str().unwrap_or_default().to_string(),
        }
    });
    (status, body, session)
}

async fn put_with(
    url: &str,
    cookie: &str,
    csrf: Option<&str>,
    key: &str,
    name: &str,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/sites/{SITE}/tx"))
        .header(COOKIE, cookie)
        .json(&json!({"ops": [{"put": {"collection": "profiles", "key": key, "value": {"name": name}}}]}));
    if let Some(csrf) = csrf {
        req = req.header("X-CSRF-Token", csrf);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_up_and_edit_only_their_own_profile() {
    let node = TestNode::start_with(|c| c.studio_site = Some(SITE.into()))
        .await
        .unwrap();
    let admin = node.admin();
    admin.create_site(SITE).await.unwrap();
    admin
        .tx(
            SITE,
            &TxRequest {
                ops: bundle::deploy_ops(&bundle::demo(), &[]),
                client_id: None,
                seq: None,
            },
        )
        .await
        .unwrap();
    let url = node.node.url();

    // Names: rules, reserved words, and names taken by an account or a profile.
    let (status, body, _) = auth(&url, "signup", "Bad Name", "long enough").await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = auth(&url, "signup", "admin", "long enough").await;
    assert_eq!(status, 400);
    let (status, body, _) = auth(&url, "signup", "alice", "long enough").await;
    assert_eq!(status, 409, "alice has a profile already: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("taken"));
    let (status, _, _) = auth(&url, "signup", "dora", "short").await;
    assert_eq!(status, 400, "a short password");

    let (status, body, dora) = auth(&url, "signup", "dora", "correct horse").await;
    assert_eq!(status, 201, "{body}");
    let dora = dora.expect("a session cookie");
    assert_eq!(body["username"], "dora");
    let (status, _, _) = auth(&url, "signup", "dora", "another one").await;
    assert_eq!(status, 409, "a taken name");

    // Writes with the cookie need the CSRF token; then only the person's own profile.
    let (status, body) = put_with(&url, &dora.cookie, None, "dora", "Dora").await;
    assert_eq!(status, 403, "no CSRF token: {body}");
    let (status, _) = put_with(
        &url,
        &dora.cookie,
        Some("0".repeat(64).as_str()),
        "dora",
        "Dora",
    )
    .await;
    assert_eq!(status, 403, "a wrong CSRF token");
    let (status, body) = put_with(&url, &dora.cookie, Some(&dora.csrf), "dora", "Dora").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = put_with(&url, &dora.cookie, Some(&dora.csrf), "alice", "Not Alice").await;
    assert_eq!(status, 403, "someone else's profile");
    assert_eq!(
        admin
            .get(SITE, "profiles", "alice")
            .await
            .unwrap()
            .value
            .to_json()["name"],
        "Alice Liddell"
    );
    // The cookie reaches nothing site-wide.
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/sites/{SITE}/tokens"))
        .header(COOKIE, &dora.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Who am I, with the CSRF token again for a reloaded page.
    let me: Value = reqwest::Client::new()
        .get(format!("{url}/v1/auth/session"))
        .header(COOKIE, &dora.cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (me["username"].as_str(), me["csrf"].as_str()),
        (Some("dora"), Some(dora.csrf.as_str()))
    );

    // Log in: a wrong password is told apart from nothing; a right one starts a new session
    // even when the browser already carries a cookie an attacker planted (no fixation).
    let (status, body, none) = auth(&url, "login", "dora", "wrong horse").await;
    assert_eq!(status, 401, "{body}");
    assert!(none.is_none());
    let planted = "sesame_session=ssm_planted_by_an_attacker";
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/auth/login"))
        .header(COOKIE, planted)
        .json(&json!({"username": "dora", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(!set.contains("ssm_planted_by_an_attacker"), "{set}");
    let (status, _) = put_with(&url, planted, Some(&dora.csrf), "dora", "Fixated").await;
    assert_eq!(status, 401, "a planted cookie is no session");

    // Log out: that session's cookie stops working; logging out needs the CSRF token too.
    let out = reqwest::Client::new()
        .post(format!("{url}/v1/auth/logout"))
        .header(COOKIE, &dora.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 403, "logout without the CSRF token");
    let out = reqwest::Client::new()
        .post(format!("{url}/v1/auth/logout"))
        .header(COOKIE, &dora.cookie)
        .header("X-CSRF-Token", &dora.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    let (status, _) = put_with(&url, &dora.cookie, Some(&dora.csrf), "dora", "After").await;
    assert_eq!(status, 401, "a logged-out session");

    // Failed logins are limited per name.
    let mut limited = false;
    for _ in 0..8 {
        let (status, _, _) = auth(&url, "login", "dora", "not the password").await;
        if status == 429 {
            limited = true;
            break;
        }
        assert_eq!(status, 401);
    }
    assert!(limited, "failed logins were never limited");
    let (status, _, _) = auth(&url, "login", "dora", "correct horse").await;
    assert_eq!(
        status, 429,
        "the limit holds for the right password too, for a while"
    );
    node.stop().await.unwrap();
}
