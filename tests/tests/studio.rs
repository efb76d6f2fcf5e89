//! The studio in headless Chromium, as a person uses it: sign up, edit the page, pick a
//! theme, see "Your site will update shortly" turn into "Published …", and the public page
//! change; the same without JavaScript; previews; and forms that did not come from the
//! person's own studio page are refused. Screenshots of the studio and the public page, at
//! desktop and phone widths, go to `target/test-artifacts/`.

use std::time::Duration;

use fantoccini::{Client, Locator};
use reqwest::header::{COOKIE, LOCATION};
use sesame_tests::browser::{
    artifacts_dir, axe_script, axe_violations, text_if_there, wait_for, Driver,
};
use sesame_tests::studio::{http_post_form, http_sign_up};
use sesame_tests::TestNode;

const WAIT: Duration = Duration::from_secs(30);

async fn studio_node() -> TestNode {
    let node = TestNode::start_with(|c| {
        c.write_rate = None;
        c.studio_site = Some("demo".into());
    })
    .await
    .unwrap();
    assert!(sesame_node::cli::seed_demo(&node.node.node).await.unwrap());
    node
}

async fn fill(b: &Client, css: &str, value: &str) {
    let e = b.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn click(b: &Client, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn text(b: &Client, css: &str) -> String {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn screenshots(b: &Client, name: &str) {
    for (width, height, size) in [(1200, 900, "desktop"), (390, 844, "phone")] {
        b.set_window_size(width, height).await.unwrap();
        let png = b.screenshot().await.unwrap();
        std::fs::write(artifacts_dir().join(format!("{name}-{size}.png")), png).unwrap();
    }
    b.set_window_size(1000, 1200).await.unwrap();
}

async fn sign_up(b: &Client, url: &str, username: &str) {
    b.goto(&format!("{url}/_studio/")).await.unwrap();
    fill(b, "#su-name", username).await;
    fill(b, "#su-pass", "correct horse battery").await;
    click(b, "form[action='/_studio/signup'] button").await;
    wait_for(WAIT, "the editor opens", || async {
        Ok(b.find(Locator::Css("#name")).await.is_ok().then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_up_edits_and_sees_their_page_change() {
    let node = studio_node().await;
    let url = node.node.url();
    let driver = Driver::start().await.unwrap();
    let b = driver.session(true).await.unwrap();
    b.goto(&format!("{url}/_studio/")).await.unwrap();
    screenshots(&b, "studio-welcome").await;
    let axe = axe_script().unwrap();
    let found = axe_violations(&b, &axe).await.unwrap();
    assert!(found.is_empty(), "the welcome page: {found:#?}");

    // A taken name is said plainly.
    fill(&b, "#su-name", "alice").await;
    fill(&b, "#su-pass", "correct horse battery").await;
    click(&b, "form[action='/_studio/signup'] button").await;
    assert!(text(&b, ".error").await.contains("taken"));

    sign_up(&b, &url, "dora").await;
    assert!(text(&b, "h1").await.contains("dora"));
    fill(&b, "#name", "Dora the Explorer").await;
    fill(&b, "#bio", "Maps, backpacks and consensus.").await;
    fill(&b, "#links", "Blog https://example.com/dora").await;
    click(&b, "input[name=theme][value=midnight]").await;
    click(&b, ".actions button[type=submit]:not(.secondary)").await;
    // The status says the site is updating, then that it published (the script polls).
    let published = wait_for(WAIT, "the studio says it published", || async {
        let t = text_if_there(&b, "#status").await;
        Ok(t.filter(|t| t.starts_with("Published")))
    })
    .await
    .unwrap();
    assert!(published.contains("version"), "{published}");
    screenshots(&b, "studio-editor").await;
    let found = axe_violations(&b, &axe).await.unwrap();
    assert!(found.is_empty(), "the editor: {found:#?}");

    // The public page shows the edit, in the chosen theme.
    b.goto(&format!("{url}/demo/dora")).await.unwrap();
    assert_eq!(text(&b, "h1").await, "Dora the Explorer");
    let class = b
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .attr("class")
        .await
        .unwrap();
    assert_eq!(class.as_deref(), Some("theme-midnight"));
    screenshots(&b, "public-page").await;
    let found = axe_violations(&b, &axe).await.unwrap();
    assert!(
        found.is_empty(),
        "the public page (midnight theme): {found:#?}"
    );

    // Without JavaScript the studio works too: sign up, save, and the page reloads to the
    // status.
    let nojs = driver.session(false).await.unwrap();
    sign_up(&nojs, &url, "eve").await;
    fill(&nojs, "#name", "Eve Without Scripts").await;
    click(&nojs, ".actions button[type=submit]:not(.secondary)").await;
    wait_for(WAIT, "the no-JS save lands", || async {
        nojs.goto(&format!("{url}/_studio/")).await?;
        let t = text_if_there(&nojs, "#status").await;
        Ok(t.filter(|t| t.starts_with("Published")).map(|_| ()))
    })
    .await
    .unwrap();
    let page = reqwest::get(format!("{url}/demo/eve"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Eve Without Scripts"));
    driver.quit().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studio_forms_refuse_forgeries_and_preview_without_publishing() {
    let node = studio_node().await;
    let url = node.node.url();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (cookie, csrf) = http_sign_up(&url, "fay").await;
    let save = |cookie: String, csrf: String, name: &'static str| {
        let url = url.clone();
        async move {
            let fields = [("_csrf", csrf.as_str()), ("name", name), ("theme", "paper")];
            http_post_form(&url, "/_studio/save", &cookie, &fields).await
        }
    };
    // A form from another page (no or a wrong CSRF field) is refused, and nothing is saved.
    let forged = save(cookie.clone(), String::new(), "Forged").await;
    assert_eq!(forged.status(), 403);
    let (other_cookie, other_csrf) = http_sign_up(&url, "gus").await;
    let crossed = save(cookie.clone(), other_csrf.clone(), "Crossed").await;
    assert_eq!(crossed.status(), 403, "another person's CSRF token");
    drop(other_cookie);
    assert!(node.admin().get("demo", "profiles", "fay").await.is_err());

    // A preview renders the change privately; the public page does not move.
    let fields = [
        ("_csrf", csrf.as_str()),
        ("name", "Fay Previewed"),
        ("theme", "paper"),
    ];
    let r = http_post_form(&url, "/_studio/preview", &cookie, &fields).await;
    assert_eq!(r.status(), 303);
    let preview_url = r.headers()[LOCATION].to_str().unwrap().to_string();
    assert!(preview_url.contains("/_preview/demo/"), "{preview_url}");
    let preview = reqwest::get(&preview_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(preview.contains("Fay Previewed") && preview.contains("theme-paper"));
    assert_eq!(
        reqwest::get(format!("{url}/demo/fay"))
            .await
            .unwrap()
            .status(),
        404
    );

    // A real save lands; bad input is said and nothing is lost from the form.
    let saved = save(cookie.clone(), csrf.clone(), "Fay").await;
    assert_eq!(saved.status(), 303);
    let fields = [
        ("_csrf", csrf.as_str()),
        ("name", "Fay"),
        ("links", "Home javascript:alert(1)"),
    ];
    let bad = http_post_form(&url, "/_studio/save", &cookie, &fields).await;
    assert_eq!(bad.status(), 400);
    let body = bad.text().await.unwrap();
    assert!(
        body.contains("https://") && body.contains("javascript:alert(1)"),
        "{body}"
    );
    // A picture: checked by its bytes, stored as the person's asset, shown on their page.
    let upload = |bytes: Vec<u8>, csrf: String| {
        let client = client.clone();
        let url = url.clone();
        let cookie = cookie.clone();
        async move {
            let boundary = "sesame-test-boundary";
            let mut body = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"_csrf\"\r\n\r\n{csrf}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"avatar\"; filename=\"me.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .into_bytes();
            body.extend_from_slice(&bytes);
            body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            client
                .post(format!("{url}/_studio/avatar"))
                .header(COOKIE, cookie)
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&[0u8; 64]);
    assert_eq!(
        upload(png.clone(), String::new()).await.status(),
        403,
        "no CSRF field"
    );
    let not_image = upload(b"<script>alert(1)</script>".to_vec(), csrf.clone()).await;
    assert_eq!(not_image.status(), 400);
    assert!(not_image
        .text()
        .await
        .unwrap()
        .contains("PNG, JPEG or WebP"));
    let huge = upload(vec![0x89; 600 << 10], csrf.clone()).await;
    assert!(
        matches!(huge.status().as_u16(), 400 | 413),
        "{}",
        huge.status()
    );
    let ok = upload(png.clone(), csrf.clone()).await;
    assert_eq!(ok.status(), 303);
    let index: u64 = ok.headers()[LOCATION]
        .to_str()
        .unwrap()
        .rsplit('=')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let page = reqwest::Client::new()
        .get(format!("{url}/demo/fay"))
        .header("Sesame-Min-Index", index.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let src = page
        .split("class=\"avatar\" src=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no avatar on the page: {page}"))
        .replace("&amp;", "&");
    let img = reqwest::get(&src).await.unwrap();
    assert_eq!(img.status(), 200);
    assert_eq!(img.headers()["content-type"], "image/png");
    assert_eq!(img.bytes().await.unwrap().to_vec(), png);

    // Earlier versions: listed, and one restores; another person's cannot be.
    let second = save(cookie.clone(), csrf.clone(), "Fay Two").await;
    assert_eq!(second.status(), 303);
    let editor = client
        .get(format!("{url}/_studio/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(editor.contains("Earlier versions"), "{editor}");
    let keys: Vec<String> = editor
        .split("name=\"key\" value=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_string())
        .collect();
    assert!(
        keys.len() >= 2 && keys.iter().all(|k| k.starts_with("fay/")),
        "{keys:?}"
    );
    assert!(
        editor.contains("changes back once it is published")
            && editor.contains("your picture stays as it is"),
        "the studio says what a restore does: {editor}"
    );
    // Newest first: the second entry is the save before "Fay Two" (made before the picture).
    let restored = client
        .post(format!("{url}/_studio/restore"))
        .header(COOKIE, &cookie)
        .form(&[("_csrf", csrf.as_str()), ("key", keys[1].as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(restored.status(), 303);
    // A restore is a save: one committed transaction through the write path, whose index
    // the studio waits for and the profile now carries.
    let restore_index: u64 = restored.headers()[LOCATION]
        .to_str()
        .unwrap()
        .strip_prefix("/_studio/?saved=")
        .expect("back to the studio with the commit index")
        .parse()
        .unwrap();
    let profile = node.admin().get("demo", "profiles", "fay").await.unwrap();
    assert_eq!(profile.version, restore_index);
    let profile = profile.value.to_json();
    assert_eq!(profile["name"], "Fay", "the earlier version is back");
    assert!(
        profile["avatar"]
            .as_str()
            .is_some_and(|a| a.starts_with("avatars/fay.")),
        "the picture stays: {profile}"
    );
    // The public page changes back, picture and all.
    let page = reqwest::Client::new()
        .get(format!("{url}/demo/fay"))
        .header("Sesame-Min-Index", restore_index.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<h1") && page.contains(">Fay</h1>") && !page.contains("Fay Two"),
        "{page}"
    );
    assert!(page.contains("class=\"avatar\""), "{page}");
    // And it is in the history, newest, so the person can go forward again.
    let history = node
        .admin()
        .scan(
            "demo",
            sesame_node::http::accounts::HISTORY_COLLECTION,
            "fay/",
            None,
            50,
        )
        .await
        .unwrap();
    let newest = history.tuples.last().expect("history entries");
    assert_eq!(newest.version, restore_index);
    assert_eq!(newest.value.to_json()["name"], "Fay");
    assert_eq!(history.tuples.len(), keys.len() + 1);
    let theirs = client
        .post(format!("{url}/_studio/restore"))
        .header(COOKIE, &cookie)
        .form(&[("_csrf", csrf.as_str()), ("key", "gus/0000000000001")])
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 403);

    // The person's own page as a ZIP: their page, the stylesheet and their picture.
    let zip = client
        .get(format!("{url}/_studio/export.zip"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), 200);
    let bytes = zip.bytes().await.unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("fay")), "{names:?}");
    assert!(names.iter().any(|n| n == "style.css"), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("avatars/fay.")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("alice")),
        "only their own page: {names:?}"
    );

    // Past the per-person limit, the studio says when the person can save again.
    let mut limited = None;
    for _ in 0..25 {
        let r = save(cookie.clone(), csrf.clone(), "Fay Again").await;
        if r.status() != 303 {
            limited = Some(r.text().await.unwrap());
            break;
        }
    }
    let limited = limited.expect("saves were never limited");
    assert!(limited.contains("you can save again in"), "{limited}");

    // The admin dashboard: only with the admin token; people, publishes, refused writes.
    let wrong = client
        .post(format!("{url}/_studio/admin"))
        .form(&[("token", "not-the-admin-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let board = client
        .post(format!("{url}/_studio/admin"))
        .form(&[("token", node.node.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(board.status(), 200);
    let board = board.text().await.unwrap();
    for needle in [
        ">fay<",
        ">gus<",
        "Recent publishes",
        "POST /_studio/save</td><td>403",
        "Template errors",
    ] {
        assert!(
            board.contains(needle),
            "{needle} missing from the dashboard: {board}"
        );
    }
    assert!(
        !board.contains(node.node.admin_token.as_str()),
        "the token is not echoed"
    );

    // Every studio answer forbids inline scripts and framing.
    let page = client.get(format!("{url}/_studio/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    node.stop().await.unwrap();
}
