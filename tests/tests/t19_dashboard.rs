//! t19: the web dashboard (`skiff dev --ui-listen`) in a real headless Chromium, driven
//! through WebDriver, against `skiff dev` running real containers: the map shows every
//! replica on its node with its state, scaling from the page changes `skiff service ps`, a
//! rolling update started from the page shows its progress live and the blocks change
//! version, pausing and resuming it, a rollback and a node's pause and activation from the
//! page take effect, the event stream resumes after `Last-Event-ID`, calls without a token
//! (or with too low a role) are refused, and the main pages are written as screenshots
//! (`target/t19-screenshots`, or `$SKIFF_SCREENSHOTS`).
//!
//! It also measures (and prints) how long the map of a *synthetic* overview of 1,000
//! replicas on 50 nodes takes to render in this browser, and how long a real change takes
//! to reach the map.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_e2e::containers::{OciDev, Registry};
use skiff_e2e::webdriver::{http, screenshot_dir, Browser};
use skiff_e2e::{client_token, free_port};

/// How long the page may take to show what the cluster did.
const SHOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the rolling update may take.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// The map's blocks of `service` desired to run: `[{id, node, state, version}]`.
const MAP_BLOCKS: &str = "return [...document.querySelectorAll('.nodes .block:not(.leaving)')]\
    .filter(b => b.dataset.service === arguments[0])\
    .map(b => ({ id: b.dataset.alloc, node: b.dataset.node, state: b.dataset.state, version: Number(b.dataset.version) }));";

fn map_blocks(browser: &Browser, service: &str) -> Vec<Value> {
    browser
        .exec(MAP_BLOCKS, vec![json!(service)])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits (bounded) until `cond` holds for the map's blocks of `service`; returns them.
fn wait_map(
    browser: &Browser,
    service: &str,
    what: &str,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + SHOWN_TIMEOUT;
    loop {
        let blocks = map_blocks(browser, service);
        if cond(&blocks) {
            return blocks;
        }
        assert!(
            Instant::now() < deadline,
            "the map did not show {what} within {SHOWN_TIMEOUT:?}; it shows {blocks:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Clicks `button` of the page, fills the confirmation dialog's field with `value` (if
/// any), and confirms.
fn act(browser: &Browser, button: &str, value: Option<&str>) {
    browser.click(button);
    let open = browser.wait_for(
        SHOWN_TIMEOUT,
        "return document.getElementById('confirm').open;",
    );
    assert!(open.is_some(), "clicking {button} opens no confirmation");
    if let Some(value) = value {
        browser.type_into("#confirm-input", value);
    }
    browser.click("#confirm-ok");
}

#[test]
fn dashboard_maps_scales_and_rolls_out_live_and_refuses_calls_without_a_token() {
    let registry = Registry::shared();
    let ui = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cluster = OciDev::start(registry.clone(), &["--ui-listen", &ui.to_string()]);
    let url = format!("http://{ui}/");
    assert!(
        cluster.log().contains(&format!("Dashboard: {url}")),
        "skiff dev prints the dashboard's address:\n{}",
        cluster.log_tail(30)
    );
    let token = client_token(cluster.data_dir()).expect("skiff dev wrote its admin token");
    let shots = screenshot_dir();

    // No token: refused, reads and writes alike; a read-only token reads but may not scale,
    // exactly as with the CLI.
    let write = [("X-Skiff-UI", "1")];
    let body = Some(r#"{"replicas":1}"#);
    let refused = http(
        ui,
        "POST",
        "/api/services/web/scale",
        &write,
        body,
        HTTP_TIMEOUT,
    )
    .expect("POST scale");
    assert_eq!(refused.status, 401, "a write without a token: {refused:?}");
    let refused = http(ui, "GET", "/api/overview", &[], None, HTTP_TIMEOUT).expect("GET");
    assert_eq!(refused.status, 401, "a read without a token: {refused:?}");
    let created = cluster.skiff_json(&["token", "create", "viewer", "--role", "read-only"]);
    let viewer = format!("Bearer {}", created["secret"].as_str().expect("a secret"));
    let read = http(
        ui,
        "GET",
        "/api/overview",
        &[("Authorization", &viewer)],
        None,
        HTTP_TIMEOUT,
    )
    .expect("GET");
    assert_eq!(read.status, 200, "a read-only token reads: {read:?}");
    let as_viewer = [("X-Skiff-UI", "1"), ("Authorization", viewer.as_str())];
    let refused = http(
        ui,
        "POST",
        "/api/services/web/scale",
        &as_viewer,
        body,
        HTTP_TIMEOUT,
    )
    .expect("POST scale");
    assert_eq!(
        refused.status, 403,
        "a read-only token may not scale: {refused:?}"
    );
    let forged = http(
        ui,
        "POST",
        "/api/services/web/scale",
        &[("Authorization", &format!("Bearer {token}"))],
        body,
        HTTP_TIMEOUT,
    )
    .expect("POST scale");
    assert_eq!(
        forged.status, 403,
        "a write without X-Skiff-UI (a cross-site form): {forged:?}"
    );

    let (v1, v2) = (registry.image("web:v1"), registry.image("web:v2"));
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--image",
        &v1,
        "--port",
        "80",
        "--replicas",
        "3",
        "--health-http",
        "/",
        "--health-interval",
        "300ms",
        "--health-retries",
        "2",
        "--max-parallel",
        "1",
        "--min-healthy-time",
        "1s",
    ]);
    cluster.wait_replicas("web", 3, "healthy", |a| a.state == "healthy");

    // Log in.
    let browser = Browser::start(1280, 900);
    browser.goto(&url);
    let login = browser.wait_for(
        SHOWN_TIMEOUT,
        "return !document.getElementById('login').hidden && document.activeElement.id === 'token';",
    );
    assert!(
        login.is_some(),
        "without a token the page asks for one, focused"
    );
    browser.screenshot(&shots.join("login.png"));
    browser.type_into("#token", "skiff_wrong");
    browser.click("#login-form button[type=submit]");
    let error = browser.wait_for(
        SHOWN_TIMEOUT,
        "return document.getElementById('login-error').textContent;",
    );
    assert!(error.is_some(), "a wrong token is refused with a message");
    browser.type_into("#token", &token);
    browser.click("#login-form button[type=submit]");

    // The map: every replica of web on its node, with its state, as `service ps` says.
    let blocks = wait_map(&browser, "web", "3 healthy replicas of web", |b| {
        b.len() == 3
            && b.iter()
                .all(|r| r["state"] == "healthy" && r["version"] == 1)
    });
    let ps = cluster.ps("web");
    let shown: BTreeSet<(String, String)> = blocks
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap_or_default().into(),
                b["node"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    let listed: BTreeSet<(String, String)> =
        ps.iter().map(|a| (a.id.clone(), a.node.clone())).collect();
    assert_eq!(
        shown, listed,
        "the map shows each replica of `service ps` on its node"
    );
    let servers = browser.exec(
        "return document.querySelector('.servers').textContent;",
        vec![],
    );
    assert!(
        servers
            .as_str()
            .is_some_and(|s| s.contains("leader") && s.contains("term") && s.contains("commit")),
        "the map names the leader, term and commit index: {servers}"
    );
    browser.screenshot(&shots.join("map.png"));

    // Scale from the service page: `service ps` follows.
    browser.goto(&format!("{url}#/services/web"));
    assert!(browser
        .wait_for(
            SHOWN_TIMEOUT,
            "return document.querySelector('button[data-action=scale]');"
        )
        .is_some());
    act(&browser, "button[data-action=scale]", Some("5"));
    cluster.wait_replicas("web", 5, "healthy after scaling from the page", |a| {
        a.state == "healthy"
    });
    let rows = browser.wait_for(
        SHOWN_TIMEOUT,
        "const rows = document.querySelectorAll('tr[data-alloc]'); \
         return rows.length === 5 && [...rows].every(r => r.dataset.state === 'healthy');",
    );
    assert!(
        rows.is_some(),
        "the service page shows the 5 healthy replicas"
    );
    let scaled = browser.wait_for(
        SHOWN_TIMEOUT,
        "return document.querySelector('#scaling li[data-from=\"3\"][data-to=\"5\"]');",
    );
    assert!(
        scaled.is_some(),
        "the Autoscaling list shows the operator's 3 -> 5"
    );
    browser.click("button[data-logs]");
    let logs = browser.wait_for(
        SHOWN_TIMEOUT,
        "return document.querySelector('#logs pre.logs');",
    );
    assert!(
        logs.is_some(),
        "a replica's Logs button shows its last lines"
    );
    browser.screenshot(&shots.join("service.png"));

    // A rolling update started from the page, watched live: progress and versions change
    // with no reload.
    act(&browser, "button[data-action=image]", Some(&v2));
    // Pause it from the page (the deployment says so, here and in `service inspect`), then
    // resume it.
    let running = browser.wait_for(
        SHOWN_TIMEOUT,
        "const b = document.querySelector('button[data-action=pause]'); return b && !b.disabled;",
    );
    assert!(
        running.is_some(),
        "the update's deployment can be paused from the page"
    );
    act(&browser, "button[data-action=pause]", None);
    let paused = browser.wait_for(
        SHOWN_TIMEOUT,
        "const d = document.getElementById('deployment'); return d && d.dataset.status === 'paused' \
             && document.querySelector('button[data-action=resume]');",
    );
    assert!(paused.is_some(), "the page shows the deployment paused");
    assert!(
        cluster.inspect("web").to_string().contains("\"paused\""),
        "service inspect says paused: {}",
        cluster.inspect("web")
    );
    act(&browser, "button[data-action=resume]", None);
    let deadline = Instant::now() + ROLLOUT_TIMEOUT;
    let mut mixed_seen = false;
    let mut shot_further = false;
    let mut progress_seen = BTreeSet::new();
    loop {
        let sample = browser.exec(
            "const d = document.getElementById('deployment'); \
             const rows = [...document.querySelectorAll('tr[data-alloc]')]; \
             return { status: d && d.dataset.status, version: d && Number(d.dataset.version), \
                      healthy: d && document.getElementById('progress').value, \
                      versions: rows.filter(r => !r.textContent.includes('(stopping)')).map(r => Number(r.dataset.version)), \
                      states: rows.map(r => r.dataset.state) };",
            vec![],
        );
        let versions: BTreeSet<u64> = sample["versions"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if sample["version"] == 2 && sample["status"] == "running" {
            progress_seen.insert(sample["healthy"].as_u64().unwrap_or_default());
        }
        if versions.contains(&1) && versions.contains(&2) {
            // The first mixed moment, replaced by one further into the rollout.
            let further = sample["healthy"].as_u64().unwrap_or_default() >= 2;
            if !mixed_seen || (further && !shot_further) {
                browser.screenshot(&shots.join("rollout.png"));
                shot_further = further;
            }
            mixed_seen = true;
        }
        let done = sample["status"] == "succeeded"
            && versions == BTreeSet::from([2])
            && sample["states"]
                .as_array()
                .is_some_and(|s| s.len() == 5 && s.iter().all(|s| s == "healthy"));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish on the page within {ROLLOUT_TIMEOUT:?}: {sample}\n{}",
            cluster.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mixed_seen,
        "the page showed old and new versions side by side during the rollout"
    );
    assert!(
        progress_seen.len() >= 2,
        "the deployment's progress moved on the page with no reload: {progress_seen:?}"
    );
    assert!(cluster.ps("web").iter().all(|a| a.state == "healthy"));
    browser.goto(&format!("{url}#/map"));
    wait_map(&browser, "web", "5 replicas of version 2", |b| {
        b.len() == 5 && b.iter().all(|r| r["version"] == 2)
    });
    let settled = browser.wait_for(
        SHOWN_TIMEOUT,
        "return document.getElementById('attention').textContent.includes('Every deployment is done');",
    );
    assert!(
        settled.is_some(),
        "the map's first lines say that nothing needs attention"
    );

    // A change reaches the open map: measured from the CLI call to the block on the page.
    let started = Instant::now();
    cluster.skiff_ok(&["service", "scale", "web", "6"]);
    let committed = started.elapsed();
    wait_map(&browser, "web", "a 6th replica", |b| b.len() == 6);
    let shown_after = started.elapsed();
    println!(
        "MEASURED change to map: `skiff service scale web 6` returned after {} ms; the map showed the new replica {} ms after the call ({} ms after it returned)",
        committed.as_millis(),
        shown_after.as_millis(),
        (shown_after - committed).as_millis()
    );
    assert!(
        shown_after - committed < Duration::from_secs(1),
        "a change shows within 1 s: {:?} after the CLI returned",
        shown_after - committed
    );

    // The event stream resumes after the id a reconnecting browser sends (Last-Event-ID).
    let all = sse_ids(ui, &token, Some(0), 12);
    assert!(
        all.len() >= 12 && all.windows(2).all(|w| w[0] < w[1]),
        "ids: {all:?}"
    );
    let resumed = sse_ids(ui, &token, Some(all[5]), 3);
    assert_eq!(
        resumed,
        all[6..9],
        "the stream resumes right after Last-Event-ID {}",
        all[5]
    );

    // Events, live and filtered by service.
    browser.goto(&format!("{url}#/events"));
    assert!(browser
        .wait_for(
            SHOWN_TIMEOUT,
            "return document.getElementById('filter-service');"
        )
        .is_some());
    browser.type_into("#filter-service", "web");
    let filtered = browser.wait_for(
        SHOWN_TIMEOUT,
        "const items = [...document.querySelectorAll('#event-list li[data-seq]')]; \
         return items.length > 0 && items.every(i => i.dataset.service === 'web') \
             && items.some(i => i.textContent.includes('deployment-succeeded'));",
    );
    assert!(
        filtered.is_some(),
        "the events page shows web's events, the deployment's included"
    );
    browser.screenshot(&shots.join("events.png"));

    // Nodes: pause from the page, as `skiff node ls` then says; activate again.
    browser.goto(&format!("{url}#/nodes"));
    assert!(browser
        .wait_for(
            SHOWN_TIMEOUT,
            "return document.querySelector('button[data-node-action=pause]');"
        )
        .is_some());
    act(&browser, "button[data-node-action=pause]", None);
    let paused = skiff_e2e::wait_until(SHOWN_TIMEOUT, Duration::from_millis(100), || {
        cluster
            .skiff_json(&["node", "ls"])
            .to_string()
            .contains("\"pause\"")
    });
    assert!(
        paused,
        "pausing the node from the page: {}",
        cluster.skiff_json(&["node", "ls"])
    );
    assert!(browser
        .wait_for(SHOWN_TIMEOUT, "return document.querySelector('tr[data-node] .availability').textContent.startsWith('pause');")
        .is_some());
    browser.screenshot(&shots.join("nodes.png"));
    act(&browser, "button[data-node-action=active]", None);
    assert!(browser
        .wait_for(SHOWN_TIMEOUT, "return document.querySelector('tr[data-node] .availability').textContent.startsWith('active');")
        .is_some());

    // Roll back from the page: version 3 runs v1's image again.
    browser.goto(&format!("{url}#/services/web"));
    assert!(browser
        .wait_for(SHOWN_TIMEOUT, "const b = document.querySelector('button[data-action=rollback]'); return b && !b.disabled;")
        .is_some());
    act(&browser, "button[data-action=rollback]", None);
    let rolled_back = browser.wait_for(
        ROLLOUT_TIMEOUT,
        &format!(
            "const d = document.getElementById('deployment'); \
             const rows = [...document.querySelectorAll('tr[data-alloc]')]; \
             return d && d.dataset.version === '3' && d.dataset.status === 'succeeded' && rows.length === 6 \
                 && rows.every(r => r.dataset.version === '3' && r.dataset.state === 'healthy' \
                                    && r.textContent.includes({}));",
            json!(v1)
        ),
    );
    assert!(
        rolled_back.is_some(),
        "the rollback's deployment (version 3, {v1} again) succeeds on the page:\n{}",
        cluster.log_tail(30)
    );

    // A phone's width.
    browser.resize(390, 844);
    browser.goto(&format!("{url}#/map"));
    wait_map(&browser, "web", "6 replicas", |b| b.len() == 6);
    browser.screenshot(&shots.join("map-phone.png"));
    browser.resize(1280, 900);

    // SYNTHETIC: the map of 1,000 replicas on 50 nodes, fed to the page's own renderer.
    let overview = synthetic_overview(50, 20, 50);
    browser.exec("skiff.freeze(); location.hash = '#/map';", vec![]);
    let count = browser.exec(
        "skiff.showOverview(arguments[0]); return document.querySelectorAll('.nodes .block').length;",
        vec![overview.clone()],
    );
    assert_eq!(count, 1000, "the synthetic map draws every replica");
    let mut renders = Vec::new();
    let mut changes = Vec::new();
    const PAINTED: &str =
        "const done = arguments[arguments.length - 1]; const t0 = performance.now(); \
        skiff.showOverview(arguments[0]); \
        requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));";
    for round in 0..5 {
        renders.push(
            browser
                .exec_async(PAINTED, vec![overview.clone()])
                .as_f64()
                .unwrap_or(f64::MAX),
        );
        let mut changed = overview.clone();
        changed["services"][round]["replicas"][7]["state"] = json!("failed");
        changed["services"][round]["replicas"][7]["version"] = json!(3);
        changes.push(
            browser
                .exec_async(PAINTED, vec![changed])
                .as_f64()
                .unwrap_or(f64::MAX),
        );
        let failed = browser.exec(
            "return document.querySelectorAll('.nodes .block.st-failed').length;",
            vec![],
        );
        assert_eq!(failed, 1, "the changed replica is drawn as failed");
    }
    browser.screenshot(&shots.join("map-1000-synthetic.png"));
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "MEASURED (synthetic overview, 1,000 replicas on 50 nodes, headless Chromium): full map render to the second frame {:.0} ms worst of 5 (each: {:?}); one replica changed, re-rendered {:.0} ms worst of 5 (each: {:?})",
        worst(&renders),
        renders.iter().map(|v| v.round()).collect::<Vec<_>>(),
        worst(&changes),
        changes.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    assert!(
        worst(&renders) < 1000.0,
        "the 1,000-replica map renders in under 1 s: {renders:?}"
    );
    assert!(
        worst(&changes) < 1000.0,
        "a change re-renders in under 1 s: {changes:?}"
    );
    println!("screenshots in {}", shots.display());
}

/// The service page's traffic charts (fed by `GET /api/services/NAME/traffic`, a sample every
/// 2 s from the routing proxies' reports) show the requests the test sends through the
/// published port, and its Autoscaling list shows the autoscaler's decision with its reason.
#[test]
fn service_page_charts_traffic_and_lists_autoscaling_decisions() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// The requests sent at most, and for how long at most.
    const MAX_REQUESTS: u64 = 3000;
    const LOAD_FOR: Duration = Duration::from_secs(90);

    let registry = Registry::shared();
    let ui = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cluster = OciDev::start(
        registry.clone(),
        &["--ui-listen", &ui.to_string(), "--autoscale-window", "4s"],
    );
    let url = format!("http://{ui}/");
    let token = client_token(cluster.data_dir()).expect("skiff dev wrote its admin token");
    let shots = screenshot_dir();
    let publish = free_port();
    let v1 = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "api",
        "--image",
        &v1,
        "--publish",
        &format!("{publish}:80"),
        "--protocol",
        "http",
        "--health-http",
        "/",
        "--health-interval",
        "300ms",
        "--max-error-rate",
        "5",
        "--autoscale-min",
        "1",
        "--autoscale-max",
        "2",
        "--target-rps",
        "2",
    ]);
    cluster.wait_replicas("api", 1, "healthy", |a| a.state == "healthy");

    // The stream refuses a call without a token, as every read.
    let refused = http(
        ui,
        "GET",
        "/api/services/api/traffic",
        &[],
        None,
        HTTP_TIMEOUT,
    )
    .expect("GET");
    assert_eq!(refused.status, 401, "traffic without a token: {refused:?}");

    let browser = Browser::start(1280, 1000);
    browser.goto(&url);
    assert!(browser
        .wait_for(
            SHOWN_TIMEOUT,
            "return !document.getElementById('login').hidden;"
        )
        .is_some());
    browser.type_into("#token", &token);
    browser.click("#login-form button[type=submit]");
    assert!(browser
        .wait_for(SHOWN_TIMEOUT, "return document.querySelector('.servers');")
        .is_some());
    browser.goto(&format!("{url}#/services/api"));
    assert!(
        browser
            .wait_for(
                SHOWN_TIMEOUT,
                "return document.getElementById('chart-rps');"
            )
            .is_some(),
        "the service page has a requests chart"
    );

    // Load through the published port: bounded in count and time, stopped once seen.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let published = SocketAddr::from(([127, 0, 0, 1], publish));
    let load = {
        let (stop, sent, ok) = (stop.clone(), sent.clone(), ok.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < LOAD_FOR
                && sent.load(Ordering::Relaxed) < MAX_REQUESTS
            {
                sent.fetch_add(1, Ordering::Relaxed);
                let answer = http(published, "GET", "/", &[], None, Duration::from_secs(5));
                if answer.is_ok_and(|a| a.status == 200) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };

    // The chart's latest sample: a non-zero request rate.
    let rate = browser.wait_for(
        Duration::from_secs(40),
        "const f = document.getElementById('chart-rps'); \
         return f && Number(f.dataset.latest) > 0 && f.querySelector('.line') \
           ? { latest: Number(f.dataset.latest), summary: f.querySelector('.summary').textContent } : null;",
    );
    let Some(rate) = rate else {
        stop.store(true, Ordering::Relaxed);
        panic!(
            "the requests chart shows no traffic after {} requests ({} answered 200)\n{}",
            sent.load(Ordering::Relaxed),
            ok.load(Ordering::Relaxed),
            cluster.log_tail(40)
        );
    };
    println!("requests chart: {rate}");
    assert!(
        rate["summary"]
            .as_str()
            .is_some_and(|s| s.contains("requests/s")),
        "the chart says its latest value in words: {rate}"
    );
    let errors = browser.exec(
        "const f = document.getElementById('chart-errors'); \
         return { limit: f.dataset.limit, gate: !!f.querySelector('.limit'), summary: f.querySelector('.summary').textContent };",
        vec![],
    );
    assert_eq!(errors["limit"], "5", "{errors}");
    assert_eq!(
        errors["gate"], true,
        "the --max-error-rate line is drawn: {errors}"
    );

    // More than 2 requests/s on one replica: the autoscaler adds the second, and the page
    // lists the decision with its reason.
    let decision = browser.wait_for(
        Duration::from_secs(60),
        "const d = document.querySelector('#scaling li[data-from=\"1\"][data-to=\"2\"]'); \
         return d && d.dataset.automatic === 'true' ? d.textContent : null;",
    );
    stop.store(true, Ordering::Relaxed);
    let decision = decision.unwrap_or_else(|| {
        panic!(
            "no 1 -> 2 decision on the page after {} requests\n{}",
            sent.load(Ordering::Relaxed),
            cluster.log_tail(40)
        )
    });
    println!("autoscaling decision: {decision}");
    assert!(
        decision.as_str().is_some_and(|d| d.contains("rps")),
        "the decision says why: {decision}"
    );
    browser.screenshot(&shots.join("service-traffic.png"));
    load.join().expect("the load thread");
    assert!(ok.load(Ordering::Relaxed) > 0, "requests were answered");
}

/// The ids of the first `n` events `GET /api/events` streams (after `last_event_id`, sent
/// as a reconnecting browser sends it); fewer if the stream is quiet for 10 s.
fn sse_ids(ui: SocketAddr, token: &str, last_event_id: Option<u64>, n: usize) -> Vec<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(ui).expect("connect to the dashboard");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("set a read timeout");
    let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let request = format!(
        "GET /api/events HTTP/1.1\r\nHost: {ui}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n{resume}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut text, mut buffer) = (String::new(), [0u8; 16 * 1024]);
    let ids = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|line| line.strip_prefix("id: "))
            .filter_map(|id| id.trim().parse().ok())
            .collect()
    };
    while ids(&text).len() < n && Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => text.push_str(&String::from_utf8_lossy(&buffer[..read])),
            Err(_) => continue,
        }
    }
    assert!(text.starts_with("HTTP/1.1 200"), "GET /api/events: {text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{text}"
    );
    ids(&text).into_iter().take(n).collect()
}

/// An overview (the JSON of `GET /api/overview`) of `services` services of `per_service`
/// replicas each, spread over `nodes` nodes: made up, for the measurement only.
fn synthetic_overview(nodes: usize, services: usize, per_service: usize) -> Value {
    let states = [
        "healthy",
        "healthy",
        "healthy",
        "running",
        "starting",
        "unhealthy",
    ];
    let node_names: Vec<String> = (0..nodes).map(|i| format!("node-{i:02}")).collect();
    let services: Vec<Value> = (0..services)
        .map(|s| {
            let replicas: Vec<Value> = (0..per_service)
                .map(|r| {
                    json!({
                        "id": format!("{s:04x}{r:04x}-synthetic"), "service": format!("svc-{s:02}"),
                        "node": node_names[(s * per_service + r) % nodes], "desired": "run",
                        "state": states[(s + r) % states.len()], "version": 1 + (r % 3 == 0) as u64,
                        "slot": r, "host_port": 20000 + r, "restarts": 0, "message": "", "image": "synthetic",
                    })
                })
                .collect();
            json!({
                "name": format!("svc-{s:02}"), "image": "synthetic", "mode": "replicated",
                "desired": per_service, "running": per_service, "healthy": per_service, "port": 80,
                "publish": 0, "protocol": "tcp", "strategy": "rolling", "version": 2,
                "deployment": null, "unplaced_reason": "", "replicas": replicas,
            })
        })
        .collect();
    let nodes: Vec<Value> = node_names
        .iter()
        .map(|name| {
            json!({
                "name": name, "address": "10.0.0.1", "status": "ready", "availability": "active",
                "drained": false, "cpu_millis": 8000, "cpu_used": 4000, "memory_mb": 16384,
                "memory_used": 8000, "ports": 1000, "ports_used": 20, "allocations": 20,
                "last_heartbeat_secs": 1,
            })
        })
        .collect();
    json!({
        "cluster": { "leader": "s1", "term": 3, "commit_index": 123456, "applied_index": 123456,
                     "members": [{ "id": 1, "name": "s1", "address": "", "role": "leader", "reachable": "yes" }] },
        "nodes": nodes,
        "services": services,
    })
}
