//! Live pages in headless Chromium, as a person would use them: the demo's islands update
//! as tuples commit, the guestbook takes posts from the page (and without JavaScript), the
//! "newer version" notice appears after a template change, viewers see each other, a page
//! without a grant reads nothing, and with the service worker the pages of one navigation
//! come from one version and visited pages work offline. Screenshots go to
//! `target/test-artifacts/`.

use std::time::Duration;

use fantoccini::{Client, Locator};
use sesame_tests::browser::{artifacts_dir, text_if_there, wait_for, Driver};
use sesame_tests::TestNode;

const WAIT: Duration = Duration::from_secs(20);

async fn demo_node() -> TestNode {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    assert!(sesame_node::cli::seed_demo(&node.node.node).await.unwrap());
    // The demo is published before a browser looks at it.
    let status = node.admin().status("demo").await.unwrap();
    let _ = reqwest::get(format!(
        "{}/demo/alice?_min={}",
        node.node.url(),
        status.committed_index
    ))
    .await
    .unwrap();
    node
}

async fn text(b: &Client, css: &str) -> String {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn connected(b: &Client) {
    wait_for(WAIT, "live.js connects", || async {
        let v = b
            .execute(
                "return !!(window.sesameLive && window.sesameLive.connected())",
                vec![],
            )
            .await?;
        Ok(v.as_bool().unwrap_or(false).then_some(()))
    })
    .await
    .unwrap();
}

/// Fills in the guestbook form and sends it.
async fn sign(b: &Client, name: &str, text: &str) {
    for (css, value) in [
        ("form.sign input[name=name]", name),
        ("form.sign textarea[name=text]", text),
    ] {
        b.find(Locator::Css(css))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    b.find(Locator::Css("form.sign button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn screenshot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    std::fs::write(artifacts_dir().join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn islands_guestbook_notice_and_viewers() {
    let node = demo_node().await;
    let url = node.node.url();
    let admin = node.admin();
    let driver = Driver::start().await.unwrap();
    let b = driver.session(true).await.unwrap();
    b.goto(&format!("{url}/demo/alice")).await.unwrap();
    connected(&b).await;

    // A tuple written over HTTP shows on the open page, without a reload.
    let mut alice = admin
        .get("demo", "profiles", "alice")
        .await
        .unwrap()
        .value
        .to_json();
    alice["name"] = "Alice, live".into();
    admin
        .put("demo", "profiles", "alice", alice, None)
        .await
        .unwrap();
    wait_for(WAIT, "the name island updates", || async {
        Ok((text(&b, "h1").await == "Alice, live").then_some(()))
    })
    .await
    .unwrap();

    // A second viewer: both pages count two.
    let b2 = driver.session(true).await.unwrap();
    b2.goto(&format!("{url}/demo/alice")).await.unwrap();
    connected(&b2).await;
    for browser in [&b, &b2] {
        wait_for(WAIT, "the viewer count is 2", || async {
            Ok((text(browser, "[data-sesame-presence] [data-count]").await == "2").then_some(()))
        })
        .await
        .unwrap();
    }

    // Sign the guestbook from the page: it is committed, and shows on both pages.
    sign(&b, "Dinah", "Meow from the browser").await;
    for browser in [&b, &b2] {
        wait_for(WAIT, "the post shows", || async {
            Ok(text(browser, "ul.entries")
                .await
                .contains("Meow from the browser")
                .then_some(()))
        })
        .await
        .unwrap();
    }
    let posts = admin
        .scan("demo", "guestbook", "alice/", None, 10)
        .await
        .unwrap();
    assert_eq!(posts.tuples.len(), 1);
    assert_eq!(posts.tuples[0].value.to_json()["name"], "Dinah");
    screenshot(&b, "live-demo-alice.png").await;
    b2.close().await.unwrap();

    // A template change: a newer version of the page is announced. (Data changes re-render
    // the page too: start from a fresh load without the notice.)
    b.refresh().await.unwrap();
    connected(&b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        b.find(Locator::Id("sesame-newer")).await.is_err(),
        "no notice on a fresh page"
    );
    let mut tpl = admin
        .get("demo", "_templates", "profile.html")
        .await
        .unwrap()
        .value
        .to_json();
    let source = tpl["source"]
        .as_str()
        .unwrap()
        .replace("Guestbook</h2>", "Guest book</h2>");
    tpl["source"] = source.into();
    admin
        .put("demo", "_templates", "profile.html", tpl, None)
        .await
        .unwrap();
    wait_for(WAIT, "the newer-version notice", || async {
        Ok(b.find(Locator::Id("sesame-newer"))
            .await
            .is_ok()
            .then_some(()))
    })
    .await
    .unwrap();
    screenshot(&b, "live-demo-newer-version.png").await;
    b.close().await.unwrap();
    driver.quit().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_pages_work_and_without_a_grant_nothing_is_read() {
    let node = demo_node().await;
    let url = node.node.url();
    let admin = node.admin();
    let driver = Driver::start().await.unwrap();

    // No JavaScript: the page is complete, and the guestbook form posts the usual way.
    let b = driver.session(false).await.unwrap();
    b.goto(&format!("{url}/demo/bob")).await.unwrap();
    assert!(text(&b, "h1").await.contains("Bob"));
    sign(&b, "Plain", "No scripts here").await;
    wait_for(
        WAIT,
        "the post is on the page after the redirect",
        || async {
            let entries = text_if_there(&b, "ul.entries").await;
            Ok(entries
                .filter(|t| t.contains("No scripts here"))
                .map(|_| ()))
        },
    )
    .await
    .unwrap();
    assert!(b.current_url().await.unwrap().path().ends_with("/demo/bob"));
    screenshot(&b, "demo-bob-no-javascript.png").await;
    b.close().await.unwrap();

    // The grant withdrawn: the page cannot follow profiles any more.
    admin
        .put(
            "demo",
            "_live",
            "grants",
            serde_json::json!({"read": []}),
            None,
        )
        .await
        .unwrap();
    let b = driver.session(true).await.unwrap();
    b.goto(&format!("{url}/demo/carol")).await.unwrap();
    let before = text(&b, "h1").await;
    let mut carol = admin
        .get("demo", "profiles", "carol")
        .await
        .unwrap()
        .value
        .to_json();
    carol["name"] = "Carol, private".into();
    admin
        .put("demo", "profiles", "carol", carol, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        text(&b, "h1").await,
        before,
        "no grant: the island is not fed"
    );
    b.close().await.unwrap();
    driver.quit().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_worker_serves_one_version_at_a_time_and_offline() {
    let node = demo_node().await;
    let url = node.node.url();
    let admin = node.admin();
    let driver = Driver::start().await.unwrap();
    let b = driver.session(true).await.unwrap();
    b.goto(&format!("{url}/demo/alice")).await.unwrap();
    wait_for(WAIT, "the service worker controls the page", || async {
        b.refresh().await?;
        let v = b
            .execute(
                "return !!(navigator.serviceWorker && navigator.serviceWorker.controller)",
                vec![],
            )
            .await?;
        Ok(v.as_bool().unwrap_or(false).then_some(()))
    })
    .await
    .unwrap();

    // One transaction changes every page and the stylesheet: a version marker in both.
    for v in ["v1", "v2"] {
        publish_marked(&admin, v).await;
        // Navigate within the site: the page and its stylesheet agree on the version.
        for page in ["/demo/", "/demo/bob", "/demo/alice"] {
            b.goto(&format!("{url}{page}")).await.unwrap();
            let (html, css) = markers(&b).await;
            assert_eq!(html, css, "{page}: page {html} with stylesheet {css}");
        }
    }
    // The newest version arrives (the worker checks at most every few seconds).
    wait_for(WAIT, "the page moves to v2", || async {
        b.goto(&format!("{url}/demo/bob")).await?;
        let (html, css) = markers(&b).await;
        assert_eq!(html, css);
        Ok((html == "v2").then_some(()))
    })
    .await
    .unwrap();

    // Offline: the node is gone, visited pages still open.
    node.stop().await.unwrap();
    b.goto(&format!("{url}/demo/bob")).await.unwrap();
    assert!(
        text(&b, "h1").await.contains("Bob"),
        "served from the worker's cache"
    );
    // Its stylesheet too, at the content-addressed URL asset_url() wrote.
    assert_eq!(markers(&b).await, ("v2".to_string(), "v2".to_string()));
    screenshot(&b, "demo-bob-offline.png").await;
    b.close().await.unwrap();
    driver.quit().await.unwrap();
}

/// A driver's browsers end with it: sessions left open (as a failing test leaves them) are
/// ended by `quit`, by dropping the driver, and when the test process ends otherwise (here
/// a stand-in process the driver watches); the check sees them while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_leaves_no_browser_behind() {
    for how in ["quit", "drop", "the test process ends"] {
        let mut stand_in = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let driver = if how == "the test process ends" {
            Driver::start_watching(stand_in.id()).await.unwrap()
        } else {
            Driver::start().await.unwrap()
        };
        let with_js = driver.session(true).await.unwrap();
        let without_js = driver.session(false).await.unwrap();
        for b in [&with_js, &without_js] {
            b.goto("data:text/html,<title>x</title><p>hello</p>")
                .await
                .unwrap();
        }
        let running = driver.browsers();
        assert!(
            running
                .iter()
                .any(|(_, cmd)| cmd.contains("--type=renderer")),
            "{how}: the check sees the browsers' renderers: {running:#?}"
        );
        let profiles = running
            .iter()
            .filter(|(_, cmd)| cmd.contains("--user-data-dir="))
            .count();
        assert!(profiles >= 2, "{how}: two browsers: {running:#?}");
        // Their pids, to look for after the driver is gone (its own check ends with it).
        let pids: Vec<u32> = running.iter().map(|(pid, _)| *pid).collect();
        let mut kept = None;
        match how {
            "quit" => driver.quit().await.unwrap(),
            "drop" => drop(driver),
            _ => {
                stand_in.kill().unwrap();
                stand_in.wait().unwrap();
                kept = Some(driver);
            }
        }
        wait_for(WAIT, "the browsers end", || async {
            Ok(pids.iter().all(|pid| !alive(*pid)).then_some(()))
        })
        .await
        .unwrap_or_else(|e| {
            let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
            panic!("{how}: {e:#}; still running: {left:?}")
        });
        drop(kept);
        let _ = stand_in.kill();
        let _ = stand_in.wait();
    }
}

/// Whether process `pid` runs (and is not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn regex_like_replace_body(src: &str, v: &str) -> String {
    let start = src.find("<body").unwrap();
    let end = start + src[start..].find('>').unwrap() + 1;
    format!("{}<body data-v=\"{v}\">{}", &src[..start], &src[end..])
}

/// Publishes version marker `v` into the layout (every page) and the stylesheet, in one
/// transaction, and waits for it to be served.
async fn publish_marked(admin: &sesame_client::Http, v: &str) {
    let mut layout = admin
        .get("demo", "_templates", "layout.html")
        .await
        .unwrap()
        .value
        .to_json();
    layout["source"] = regex_like_replace_body(layout["source"].as_str().unwrap(), v).into();
    let css = admin
        .get("demo", "_assets", "style.css")
        .await
        .unwrap()
        .value
        .to_json();
    let mut css_text = css.as_str().expect("a text asset").to_string();
    if let Some(i) = css_text.find("\nbody::after") {
        css_text.truncate(i);
    }
    css_text.push_str(&format!("\nbody::after {{ content: \"{v}\"; }}\n"));
    let css_value = serde_json::Value::String(css_text);
    let req = sesame_proto::api::TxRequest {
        ops: vec![
            sesame_proto::Op::Put {
                collection: "_templates".into(),
                key: "layout.html".into(),
                value: sesame_proto::Value::from_json(layout).unwrap(),
                if_version: None,
            },
            sesame_proto::Op::Put {
                collection: "_assets".into(),
                key: "style.css".into(),
                value: sesame_proto::Value::from_json(css_value).unwrap(),
                if_version: None,
            },
        ],
        client_id: None,
        seq: None,
    };
    let index = admin.tx("demo", &req).await.unwrap().index;
    let _ = reqwest::get(format!("{}/demo/?_min={index}", admin.base()))
        .await
        .unwrap();
}

/// The version marker of the page's HTML and of the stylesheet it uses.
async fn markers(b: &Client) -> (String, String) {
    let v = b
        .execute(
            "return [document.body.dataset.v || '', \
             getComputedStyle(document.body, '::after').content.replace(/\"/g, '') \
               .replace(/^(none|normal)$/, '')]",
            vec![],
        )
        .await
        .unwrap();
    (
        v[0].as_str().unwrap_or_default().to_string(),
        v[1].as_str().unwrap_or_default().to_string(),
    )
}
