//! The benchmark site: the demo microsite's templates and routes (`sesame_node::pages::bundle`)
//! over generated profiles, and the helpers that start a node, load a site into it and wait
//! for its pages to be published.
//!
//! Profile `i` is a pure function of `i` (key `p000042`, a name, a bio of a sentence or
//! two, one link), so Sesame and Hugo are given the same content.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value as Json};
use sesame_client::Http;
use sesame_node::pages::bundle;
use sesame_proto::api::{SiteStatus, TxRequest};
use sesame_proto::{LogIndex, Op, Value};
use sesame_tests::TestNode;

/// The site every section writes to.
pub const SITE: &str = "bench";
/// The collection the routes make a page per tuple of.
pub const PROFILES: &str = "profiles";
/// Puts per transaction when loading a site (the node allows 10,000 ops and 8 MiB).
pub const LOAD_OPS_PER_TX: usize = 2_000;
/// How often status is polled while waiting for a first publish.
const PUBLISH_POLL: Duration = Duration::from_millis(20);
/// The demo layout's footer, which the projection section rewrites to change every page.
pub const LAYOUT_FOOTER: &str = "Static pages projected by Sesame.";

/// A small deterministic generator (splitmix64): the same seed, the same numbers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

const FIRST: &[&str] = &[
    "Ada", "Alan", "Barbara", "Edsger", "Frances", "Grace", "Ivan", "Jean", "Ken", "Leslie",
    "Margaret", "Niklaus", "Radia", "Sophie", "Tony", "Ursula",
];
const LAST: &[&str] = &[
    "Allen",
    "Hopper",
    "Kay",
    "Knuth",
    "Lamport",
    "Liskov",
    "Perlman",
    "Ritchie",
    "Sammet",
    "Thompson",
    "Turing",
    "Wilson",
    "Wirth",
    "Hamilton",
    "Dijkstra",
    "Sutherland",
];
const WORDS: &[&str] = &[
    "builds",
    "compilers",
    "consensus",
    "databases",
    "distributed",
    "gardens",
    "logs",
    "maps",
    "networks",
    "pages",
    "protocols",
    "quietly",
    "replicas",
    "sketches",
    "static",
    "systems",
    "teaches",
    "tuples",
    "writes",
    "about",
    "and",
    "loves",
    "studies",
    "the",
];

pub fn profile_key(i: usize) -> String {
    format!("p{i:06}")
}

/// The value of profile `i`: `{name, bio, links: [{title, url}]}`.
pub fn profile(i: usize) -> Json {
    let mut rng = Rng::new(i as u64 + 1);
    let name = format!("{} {}", rng.pick(FIRST), rng.pick(LAST));
    let words = 12 + rng.below(12);
    let bio: Vec<&str> = (0..words).map(|_| rng.pick(WORDS)).collect();
    json!({
        "name": name,
        "bio": format!("{}.", bio.join(" ")),
        "links": [{ "title": "Blog", "url": format!("https://example.com/{}", profile_key(i)) }],
    })
}

fn put(collection: &str, key: &str, json: Json) -> anyhow::Result<Op> {
    Ok(Op::Put {
        collection: collection.into(),
        key: key.into(),
        value: Value::from_json(json).map_err(|m| anyhow::anyhow!("value: {m}"))?,
        if_version: None,
    })
}

/// Commits `ops` in one transaction and returns its index.
pub async fn commit(admin: &Http, ops: Vec<Op>) -> anyhow::Result<LogIndex> {
    let req = TxRequest {
        ops,
        client_id: None,
        seq: None,
    };
    Ok(admin.tx(SITE, &req).await?.index)
}

/// Puts one profile in its own transaction; returns the commit index.
pub async fn put_profile(admin: &Http, key: &str, value: Json) -> anyhow::Result<LogIndex> {
    commit(admin, vec![put(PROFILES, key, value)?]).await
}

/// The demo's templates, routes and assets: the site without its sample profiles.
fn site_description() -> Vec<bundle::Entry> {
    bundle::demo()
        .into_iter()
        .filter(|e| bundle::PAGE_COLLECTIONS.contains(&e.collection.as_str()))
        .collect()
}

/// The source of one demo template.
pub fn demo_template(name: &str) -> anyhow::Result<String> {
    site_description()
        .into_iter()
        .find(|e| e.collection == "_templates" && e.key == name)
        .and_then(|e| match e.value.to_json().get("source") {
            Some(Json::String(s)) => Some(s.clone()),
            _ => None,
        })
        .with_context(|| format!("the demo bundle has no template {name}"))
}

/// The text of one demo asset.
pub fn demo_asset(name: &str) -> anyhow::Result<String> {
    site_description()
        .into_iter()
        .find(|e| e.collection == "_assets" && e.key == name)
        .and_then(|e| match e.value.to_json() {
            Json::String(s) => Some(s),
            _ => None,
        })
        .with_context(|| format!("the demo bundle has no text asset {name}"))
}

/// Rewrites the layout (which every page extends) with `footer`: every page changes.
pub async fn put_layout_footer(admin: &Http, footer: &str) -> anyhow::Result<LogIndex> {
    let layout = demo_template("layout.html")?;
    anyhow::ensure!(
        layout.contains(LAYOUT_FOOTER),
        "the demo layout no longer has the footer {LAYOUT_FOOTER:?}"
    );
    let source = layout.replace(LAYOUT_FOOTER, footer);
    commit(
        admin,
        vec![put(
            "_templates",
            "layout.html",
            json!({ "source": source }),
        )?],
    )
    .await
}

/// Starts a node in `data` for benchmarks: no write rate limit, a page limit that fits
/// [`PROFILES_MAX`] profiles, and the given projector debounce (`None`: the node's default).
pub async fn start_node(data: &Path, debounce: Option<Duration>) -> anyhow::Result<TestNode> {
    TestNode::start_in_with(data, |c| {
        c.write_rate = None;
        c.site_pages_max = SITE_PAGES_MAX;
        if let Some(d) = debounce {
            c.debounce = d;
        }
    })
    .await
}

/// Most profiles a bench site can have: the latency section's largest size (1,000,000) is ten
/// times the node's default page limit, which the bench nodes raise to fit.
pub const PROFILES_MAX: usize = 1_000_000;
/// The bench nodes' page limit (`--site-pages-max` on `sesame dev`/`node`): a page per
/// profile, the list page and the 404 page.
const SITE_PAGES_MAX: usize = PROFILES_MAX + 2;

/// Creates the site with `profiles` generated profiles (loaded first, in transactions of
/// [`LOAD_OPS_PER_TX`]), then its templates and routes in one transaction, and waits until
/// every page is published. Returns the status then.
pub async fn create(admin: &Http, profiles: usize) -> anyhow::Result<SiteStatus> {
    anyhow::ensure!(
        profiles <= PROFILES_MAX,
        "{profiles} profiles make more pages than a bench site may have ({PROFILES_MAX} \
         profiles and the list page)"
    );
    admin.create_site(SITE).await?;
    let started = Instant::now();
    let mut ops = Vec::with_capacity(LOAD_OPS_PER_TX);
    for i in 0..profiles {
        ops.push(put(PROFILES, &profile_key(i), profile(i))?);
        if ops.len() == LOAD_OPS_PER_TX || i + 1 == profiles {
            commit(admin, std::mem::take(&mut ops)).await?;
        }
    }
    let loaded = started.elapsed();
    let ops = bundle::deploy_ops(&site_description(), &[]);
    let index = commit(admin, ops).await?;
    // Generous: a first projection of 100,000 pages takes a while on two cores.
    let timeout = Duration::from_secs(60) + Duration::from_millis(5) * profiles as u32;
    let status = wait_published(admin, index, profiles as u64 + 1, timeout).await?;
    eprintln!(
        "   site of {profiles} profiles: loaded in {loaded:.1?}, first projection in {:.1?} \
         (node: {} ms)",
        started.elapsed() - loaded,
        status.last_publish_ms.unwrap_or(0)
    );
    Ok(status)
}

/// Waits until the site's served version reflects `index` and has `pages` HTML pages.
pub async fn wait_published(
    admin: &Http,
    index: LogIndex,
    pages: u64,
    timeout: Duration,
) -> anyhow::Result<SiteStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = admin.status(SITE).await?;
        if status.projected_index >= index {
            if status.pages == pages {
                return Ok(status);
            }
            if let Some(e) = &status.last_error {
                anyhow::bail!(
                    "site projected with {} of {pages} pages: {} ({})",
                    status.pages,
                    e.message,
                    e.template
                );
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "site not published within {timeout:?}: projected {} of {index}, {} of {pages} \
             pages, last error {:?}",
            status.projected_index,
            status.pages,
            status.last_error
        );
        tokio::time::sleep(PUBLISH_POLL).await;
    }
}
