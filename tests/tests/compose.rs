//! docker-compose.yml, run without Docker: its services' commands, run as local processes
//! with the real `sesame` binary. The `certs` service runs first (twice, as every
//! `docker compose up` runs it), then the three nodes, with what Docker would provide
//! mapped onto this machine: host names onto loopback addresses (`node1` → 127.0.0.11, each
//! QUIC port onto a free one), the HTTP listen address onto a free loopback port (and the
//! published `localhost:770N` with it), and named volumes onto folders of a temporary
//! directory. The cluster must form (a leader, three voters, each at its public URL) and
//! take writes through every node.
//!
//! Before running anything the test checks what it relies on, so the file cannot rot
//! quietly: the services, the flags of each command, the volumes, the start order, the
//! admin token, and the Dockerfile's entry point and user. Flags it does not know are
//! passed through, and `sesame` refuses any it does not know either.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde::Deserialize;
use serde_json::json;
use sesame_client::Http;
use sesame_tests::process::{wait_leader, NodeProcess};

const COMPOSE: &str = include_str!("../../docker-compose.yml");
const DOCKERFILE: &str = include_str!("../../Dockerfile");
/// The node services, and their node ids.
const NODES: [(&str, u64); 3] = [("node1", 1), ("node2", 2), ("node3", 3)];
/// The admin token the test gives the compose file's `SESAME_ADMIN_TOKEN`.
const TOKEN: &str = "compose-test-admin-token-0123456789";
/// How long a test waits for something that must happen (CI machines are slow).
const PATIENCE: Duration = Duration::from_secs(60);

/// The part of the compose format the test reads; other keys are Docker's business.
#[derive(Debug, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<serde_yaml::Value>>,
}

#[derive(Debug, Deserialize)]
struct Service {
    image: Option<String>,
    build: Option<serde_yaml::Value>,
    /// The exec form only: a list, so no shell quoting is involved.
    command: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    depends_on: BTreeMap<String, DependsOn>,
}

#[derive(Debug, Deserialize)]
struct DependsOn {
    condition: String,
}

/// A named volume mounted into a service.
#[derive(Debug, Clone)]
struct Mount {
    volume: String,
    target: String,
    read_only: bool,
}

/// Reads the compose file with anchors and merge keys (`<<: *node`) applied.
fn parse(text: &str) -> anyhow::Result<Compose> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).context("parse the YAML")?;
    value.apply_merge().context("apply merge keys")?;
    serde_yaml::from_value(value).context("read services, commands, volumes")
}

/// Compose's variable interpolation, for the forms a compose file may use: `$$`, `$NAME`,
/// `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`.
fn interpolate(text: &str, vars: &BTreeMap<&str, &str>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').context("an unclosed ${")?;
            let expr = &braced[..end];
            rest = &braced[end + 1..];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let value = vars.get(name).copied();
            let set = value.filter(|v| !v.is_empty());
            out.push_str(&match op {
                "" => value.unwrap_or("").to_string(),
                _ if op.starts_with(":-") => set.unwrap_or(&op[2..]).to_string(),
                _ if op.starts_with('-') => value.unwrap_or(&op[1..]).to_string(),
                _ if op.starts_with(":?") => match set {
                    Some(v) => v.to_string(),
                    None => bail!("{name} is required: {}", &op[2..]),
                },
                _ if op.starts_with('?') => match value {
                    Some(v) => v.to_string(),
                    None => bail!("{name} is required: {}", &op[1..]),
                },
                _ => bail!("unsupported interpolation ${{{expr}}}"),
            });
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            ensure!(end > 0, "a lone $ in {text:?} (write $$)");
            out.push_str(vars.get(&rest[..end]).copied().unwrap_or(""));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A command's flags: `--name=value`, `--name value`, or `--name` alone (value "").
fn flags(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut flags = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let name = arg
            .strip_prefix("--")
            .with_context(|| format!("{arg:?} is not a flag (no positional arguments here)"))?;
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => match args.get(i + 1).filter(|next| !next.starts_with("--")) {
                Some(value) => {
                    i += 1;
                    (name.to_string(), value.clone())
                }
                None => (name.to_string(), String::new()),
            },
        };
        ensure!(
            flags.insert(name.clone(), value).is_none(),
            "--{name} given twice"
        );
        i += 1;
    }
    Ok(flags)
}

fn flag<'a>(flags: &'a BTreeMap<String, String>, name: &str) -> anyhow::Result<&'a str> {
    flags
        .get(name)
        .map(String::as_str)
        .with_context(|| format!("no --{name}"))
}

/// The named volumes a service mounts (`volume:/path[:ro]`); bind mounts are refused.
fn mounts(
    service: &Service,
    declared: &BTreeMap<String, Option<serde_yaml::Value>>,
) -> anyhow::Result<Vec<Mount>> {
    service
        .volumes
        .iter()
        .map(|spec| {
            let parts: Vec<&str> = spec.split(':').collect();
            let (volume, target, mode) = match parts[..] {
                [v, t] => (v, t, ""),
                [v, t, m] => (v, t, m),
                _ => bail!("volume {spec:?} is not VOLUME:PATH[:MODE]"),
            };
            ensure!(
                declared.contains_key(volume),
                "volume {spec:?}: {volume} is not a named volume declared under volumes:"
            );
            ensure!(
                target.starts_with('/'),
                "volume {spec:?}: {target} is not absolute"
            );
            ensure!(
                matches!(mode, "" | "ro" | "rw"),
                "volume {spec:?}: mode {mode}"
            );
            Ok(Mount {
                volume: volume.into(),
                target: target.into(),
                read_only: mode == "ro",
            })
        })
        .collect()
}

/// The mount whose target holds `path` (the path itself or a folder above it).
fn mount_of<'a>(mounts: &'a [Mount], path: &str) -> anyhow::Result<&'a Mount> {
    mounts
        .iter()
        .find(|m| path == m.target || path.starts_with(&format!("{}/", m.target)))
        .with_context(|| format!("{path} is on no mounted volume"))
}

/// `HOST:PORT` split, with the port as a number.
fn host_port(addr: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr} has no port"))?;
    Ok((
        host,
        port.parse().with_context(|| format!("port of {addr}"))?,
    ))
}

/// What running one node service takes here.
struct NodePlan {
    service: String,
    id: u64,
    command: Vec<String>,
    env: Vec<(String, String)>,
    /// The container's HTTP port, and the host port it is published on.
    http_port: u16,
    published: u16,
    mounts: Vec<Mount>,
}

/// What running the compose file takes here.
struct Plan {
    certs_command: Vec<String>,
    certs_mounts: Vec<Mount>,
    nodes: Vec<NodePlan>,
}

/// Checks what the test relies on, and returns how to run each service.
fn check(compose: &Compose, vars: &BTreeMap<&str, &str>) -> anyhow::Result<Plan> {
    let service = |name: &str| {
        compose
            .services
            .get(name)
            .with_context(|| format!("no service {name}"))
    };
    let certs = service("certs")?;
    let image = certs.image.as_deref().context("certs: no image")?;
    for name in ["certs", "node1", "node2", "node3"] {
        let s = service(name)?;
        ensure!(
            s.image.as_deref() == Some(image),
            "{name}: not the image {image} the others run"
        );
        let context = match &s.build {
            Some(serde_yaml::Value::String(c)) => c.clone(),
            Some(serde_yaml::Value::Mapping(m)) => m
                .get("context")
                .and_then(|c| c.as_str())
                .context("build: no context")?
                .to_string(),
            _ => bail!("{name}: not built from the Dockerfile (no build:)"),
        };
        ensure!(
            context == ".",
            "{name}: built from {context}, not the top-level Dockerfile"
        );
    }

    let certs_mounts = mounts(certs, &compose.volumes).context("certs")?;
    ensure!(
        certs
            .command
            .starts_with(&["cluster".to_string(), "certs".to_string()]),
        "certs: the command is not `cluster certs`: {:?}",
        certs.command
    );
    let certs_flags = flags(&certs.command[2..]).context("certs")?;
    let out = flag(&certs_flags, "out")?;
    let out_mount = mount_of(&certs_mounts, out)
        .context("certs: --out")?
        .clone();
    ensure!(!out_mount.read_only, "certs: --out {out} is read-only");
    ensure!(
        flag(&certs_flags, "nodes")? == "1,2,3",
        "certs: --nodes is not 1,2,3"
    );
    ensure!(
        certs_flags.contains_key("skip-existing"),
        "certs: without --skip-existing a second `docker compose up` fails"
    );

    let mut plans = Vec::new();
    let mut data_volumes = Vec::new();
    for (name, id) in NODES {
        let s = service(name)?;
        let cx = |e: anyhow::Error| e.context(format!("service {name}"));
        ensure!(
            s.depends_on.get("certs").map(|d| d.condition.as_str())
                == Some("service_completed_successfully"),
            "{name}: does not wait for certs to complete"
        );
        ensure!(
            s.command.first().map(String::as_str) == Some("node"),
            "{name}: not `node`"
        );
        let f = flags(&s.command[1..]).map_err(cx)?;
        ensure!(
            flag(&f, "id")? == id.to_string(),
            "{name}: --id is not {id}"
        );
        let node_mounts = mounts(s, &compose.volumes).map_err(cx)?;

        let data = mount_of(&node_mounts, flag(&f, "data")?).map_err(cx)?;
        ensure!(!data.read_only, "{name}: its data volume is read-only");
        ensure!(
            !data_volumes.contains(&data.volume),
            "{name}: shares data volume {}",
            data.volume
        );
        data_volumes.push(data.volume.clone());

        // Its certificate folder: the one the certs service made for this id.
        let node_certs = flag(&f, "certs")?;
        let certs_mount = mount_of(&node_mounts, node_certs).map_err(cx)?;
        ensure!(
            certs_mount.volume == out_mount.volume,
            "{name}: --certs is not on the volume certs writes"
        );
        let relative = node_certs[certs_mount.target.len()..].trim_start_matches('/');
        let made = &out[out_mount.target.len()..];
        let made = made.trim_start_matches('/');
        let expected = [made, &id.to_string()]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        ensure!(
            relative == expected,
            "{name}: --certs {node_certs} is not node {id}'s folder"
        );

        let (_, raft_port) = host_port(flag(&f, "raft")?)?;
        ensure!(
            flag(&f, "raft")? == format!("{name}:{raft_port}"),
            "{name}: --raft is not {name}:PORT"
        );
        let (listen, http_port) = host_port(flag(&f, "http")?)?;
        ensure!(
            listen == "0.0.0.0",
            "{name}: --http listens on {listen}, not every address"
        );
        let published = s
            .ports
            .iter()
            .find_map(|p| {
                let parts: Vec<&str> = p.split(':').collect();
                let (host, container) = match parts[..] {
                    [h, c] | [_, h, c] => (h, c),
                    _ => return None,
                };
                (container.parse() == Ok(http_port)).then(|| host.parse::<u16>().ok())?
            })
            .with_context(|| format!("{name}: HTTP port {http_port} is not published"))?;
        if let Some(public) = f.get("public-url") {
            ensure!(
                public == &format!("http://localhost:{published}"),
                "{name}: --public-url {public} is not where its HTTP is published"
            );
        }

        let mut env = Vec::new();
        for (key, value) in &s.environment {
            env.push((key.clone(), interpolate(value, vars).map_err(cx)?));
        }
        let command = s
            .command
            .iter()
            .map(|a| interpolate(a, vars))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(cx)?;
        // As `sesame node` takes it: the flag, else the variable.
        let token = flags(&command[1..])?
            .get("admin-token")
            .cloned()
            .or_else(|| {
                env.iter()
                    .find(|(k, _)| k == "SESAME_ADMIN_TOKEN")
                    .map(|(_, v)| v.clone())
            })
            .with_context(|| format!("{name}: no admin token (SESAME_ADMIN_TOKEN)"))?;
        ensure!(
            token == TOKEN,
            "{name}: the admin token is not ${{SESAME_ADMIN_TOKEN}}"
        );
        plans.push(NodePlan {
            service: name.into(),
            id,
            command,
            env,
            http_port,
            published,
            mounts: node_mounts,
        });
    }
    // Every node names the same voters, at the addresses they listen at.
    let expected_initial = plans
        .iter()
        .map(|p| {
            let f = flags(&p.command[1..])?;
            Ok(format!("{}={}", p.id, flag(&f, "raft")?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(",");
    for plan in &plans {
        let f = flags(&plan.command[1..])?;
        ensure!(
            flag(&f, "initial-cluster")? == expected_initial,
            "{}: --initial-cluster is not {expected_initial}",
            plan.service
        );
    }
    let certs_command = certs
        .command
        .iter()
        .map(|a| interpolate(a, vars))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Plan {
        certs_command,
        certs_mounts,
        nodes: plans,
    })
}

/// The Dockerfile's runtime stage runs `sesame` as a user who owns /data and /certs.
fn check_dockerfile(text: &str) -> anyhow::Result<()> {
    let runtime = text
        .rsplit_once("\nFROM ")
        .context("no runtime stage (multi-stage build)")?
        .1;
    ensure!(
        runtime
            .lines()
            .any(|l| l.trim() == r#"ENTRYPOINT ["sesame"]"#),
        "the entry point is not sesame: the compose commands are its arguments"
    );
    let user = runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .context("the runtime stage runs as root")?
        .trim();
    ensure!(
        user != "root" && user != "0",
        "the runtime stage runs as root"
    );
    ensure!(
        runtime.lines().any(|l| l.contains("chown")
            && l.contains(user)
            && l.contains("/data")
            && l.contains("/certs")),
        "{user} does not own /data and /certs (named volumes copy the image's owner)"
    );
    ensure!(
        runtime.contains("COPY --from=") && runtime.contains("/sesame"),
        "the runtime stage does not copy in the built binary"
    );
    Ok(())
}

/// Maps values of the compose world onto this machine: mounted paths onto folders, and
/// addresses onto loopback ones.
struct World {
    volumes: PathBuf,
    /// `node1:7800` → `127.0.0.11:PORT`, `localhost:7701` → node1's HTTP address, ...
    addresses: Vec<(String, String)>,
}

impl World {
    /// `own` maps addresses that mean something else in each container (`0.0.0.0:7700`).
    fn map(&self, mounts: &[Mount], own: &[(String, String)], value: &str) -> String {
        if let Ok(m) = mount_of(mounts, value) {
            let below = value[m.target.len()..].trim_start_matches('/');
            let dir = self.volumes.join(&m.volume).join(below);
            return dir.to_string_lossy().into_owned();
        }
        let mut value = value.to_string();
        for (from, to) in own.iter().chain(&self.addresses) {
            value = value.replace(from.as_str(), to);
        }
        value
    }

    fn map_args(
        &self,
        mounts: &[Mount],
        own: &[(String, String)],
        args: &[String],
    ) -> Vec<std::ffi::OsString> {
        args.iter()
            .map(
                |arg| match arg.strip_prefix("--").and_then(|a| a.split_once('=')) {
                    Some((name, value)) => format!("--{name}={}", self.map(mounts, own, value)),
                    None => self.map(mounts, own, arg),
                },
            )
            .map(Into::into)
            .collect()
    }
}

/// A free port on `ip`, for UDP or TCP.
fn free_port(ip: IpAddr, udp: bool) -> anyhow::Result<u16> {
    let addr = SocketAddr::new(ip, 0);
    Ok(if udp {
        std::net::UdpSocket::bind(addr)?.local_addr()?.port()
    } else {
        std::net::TcpListener::bind(addr)?.local_addr()?.port()
    })
}

#[test]
fn the_compose_file_needs_an_admin_token_and_keeps_its_shape() {
    let compose = parse(COMPOSE).unwrap();
    let err = check(&compose, &BTreeMap::new())
        .err()
        .expect("no token, no cluster");
    assert!(format!("{err:#}").contains("SESAME_ADMIN_TOKEN"), "{err:#}");
    check(&compose, &BTreeMap::from([("SESAME_ADMIN_TOKEN", TOKEN)])).unwrap();
    check_dockerfile(DOCKERFILE).unwrap();

    // The checks catch what would break the cluster.
    let broken = [
        ("--raft=node2:7800", "--raft=node2:7900"),
        ("node3-data:/data", "node1-data:/data"),
        (r#", "--skip-existing"]"#, "]"),
        ("service_completed_successfully", "service_started"),
        ("--certs=/certs/3", "--certs=/certs/1"),
    ];
    for (from, to) in broken {
        let text = COMPOSE.replacen(from, to, 1);
        assert_ne!(text, COMPOSE, "{from} is not in docker-compose.yml");
        let checked =
            parse(&text).and_then(|c| check(&c, &BTreeMap::from([("SESAME_ADMIN_TOKEN", TOKEN)])));
        assert!(checked.is_err(), "{from} → {to} went unnoticed");
    }
    assert!(check_dockerfile(&DOCKERFILE.replace("USER sesame", "")).is_err());

    let vars = BTreeMap::from([("A", "x"), ("E", "")]);
    assert_eq!(
        interpolate("$$A ${A} $A ${B:-d} ${E:-d} ${E-d}", &vars).unwrap(),
        "$A x x d d "
    );
    assert!(interpolate("${B:?needed}", &vars).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_runs_as_local_processes() {
    check_dockerfile(DOCKERFILE).unwrap();
    let compose = parse(COMPOSE).unwrap();
    let vars = BTreeMap::from([("SESAME_ADMIN_TOKEN", TOKEN)]);
    let plan = check(&compose, &vars).unwrap();
    let bin = sesame_tests::sesame_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // node1 → 127.0.0.11 and so on, with free ports there; published ports → the HTTP ones.
    let mut addresses = Vec::new();
    let mut https = BTreeMap::new();
    for node in &plan.nodes {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + node.id as u8));
        let f = flags(&node.command[1..]).unwrap();
        let raft = flag(&f, "raft").unwrap();
        let port = free_port(ip, true).unwrap();
        addresses.push((raft.to_string(), format!("{ip}:{port}")));
        let http = SocketAddr::new(ip, free_port(ip, false).unwrap());
        https.insert(node.id, http);
        addresses.push((format!("localhost:{}", node.published), http.to_string()));
    }
    let world = World {
        volumes: dir.path().join("volumes"),
        addresses,
    };
    for volume in compose.volumes.keys() {
        std::fs::create_dir_all(world.volumes.join(volume)).unwrap();
    }

    // The certs service, as every `docker compose up` runs it: the second run keeps all.
    for run in 0..2 {
        let out = std::process::Command::new(&bin)
            .args(world.map_args(&plan.certs_mounts, &[], &plan.certs_command))
            .output()
            .unwrap();
        assert!(out.status.success(), "certs, run {run}: {out:?}");
    }

    let mut nodes = Vec::new();
    for node in &plan.nodes {
        let http = https[&node.id];
        let own = [(format!("0.0.0.0:{}", node.http_port), http.to_string())];
        let args = world.map_args(&node.mounts, &own, &node.command);
        let log = dir.path().join(format!("{}.log", node.service));
        let mut process = NodeProcess::new(&node.service, &bin, args, node.env.clone(), http, log);
        process.spawn().unwrap();
        nodes.push(process);
    }
    for node in &mut nodes {
        node.wait_http().await.unwrap();
    }
    let urls: Vec<String> = nodes.iter().map(NodeProcess::url).collect();
    let leader = wait_leader(&urls, TOKEN, PATIENCE).await.unwrap();

    // A leader, three voters, each at the URL its --public-url names.
    let status = Http::new(&urls[0], Some(TOKEN.into()))
        .cluster_status()
        .await
        .unwrap();
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.members.len(), 3, "{status:?}");
    for member in &status.members {
        assert_eq!(member.role, "voter", "{member:?}");
        assert_eq!(
            member.http.as_deref(),
            Some(format!("http://{}", https[&member.id]).as_str()),
            "{member:?}"
        );
    }

    // Writes through each node, read on every node; and through all three at once, as the
    // compose file's header shows the CLI doing.
    let all = Http::with_nodes(&urls, Some(TOKEN.into()));
    all.create_site("s").await.unwrap();
    let mut newest = 0;
    for (i, url) in urls.iter().enumerate() {
        let written = Http::new(url, Some(TOKEN.into()))
            .put("s", "t", &format!("via-{i}"), json!(i), None)
            .await
            .unwrap();
        newest = newest.max(written.index);
    }
    for url in &urls {
        let client = Http::new(url, Some(TOKEN.into()));
        for i in 0..urls.len() {
            let t = client
                .get_with("s", "t", &format!("via-{i}"), "linearizable", None)
                .await
                .unwrap();
            assert_eq!(t.value.to_json(), json!(i), "{url}");
        }
    }
    assert!(
        all.put("s", "t", "all", json!("three"), None)
            .await
            .unwrap()
            .index
            > newest
    );
}
