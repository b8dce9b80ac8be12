//! Sluice's canary routing, end to end: a real Envoy (`--concurrency 2`, so
//! two worker VMs) loading the release sluice.wasm, real upstream servers,
//! real HTTP.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`.
//!
//! Every test starts its own upstreams and Envoy on ports the kernel picks,
//! so tests run in parallel and in any order.

// A failing harness is a failing test: panicking on setup errors is the
// clearest report, so the workspace's no-panic lints do not apply here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Envoy, EnvoyConfig, Response, Upstream};

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
                      (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
const ANDROID_PHONE: &str = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 \
                             (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36";
const DESKTOP_CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
                              (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
const DESKTOP_FIREFOX: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0";

/// The spec's example service, with a chosen weight.
fn shop_service(name: &str, authority: &str, weight: f64) -> Value {
    json!({
        "name": name,
        "match": {"authority": authority, "path_prefix": "/"},
        "stable": "shop_v1",
        "canary": "shop_v2",
        "weight": weight,
        "sticky": {"header": "x-user-id"},
        "rules": [
            {"header": "x-canary", "equals": "always", "to": "canary"},
            {"header": "x-canary", "equals": "never", "to": "stable"},
            {"cookie": "beta", "equals": "yes", "to": "canary"},
            {"device": "mobile", "weight": 50}
        ]
    })
}

fn shop_config(weight: f64) -> Value {
    json!({
        "steering_header": "x-sluice-cluster",
        "services": [shop_service("shop", "shop.local", weight)]
    })
}

/// Fail with a clear message unless the wasm was built.
fn require_wasm() {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
}

/// A stable and a canary upstream (clusters shop_v1 and shop_v2) behind an
/// Envoy running Sluice with `sluice` as its config.
struct Rig {
    stable: Upstream,
    canary: Upstream,
    /// Present when the config added it (forged-header test).
    secret: Option<Upstream>,
    envoy: Envoy,
}

impl Rig {
    fn start(sluice: &Value) -> Rig {
        Rig::start_with(sluice, false, |c| c)
    }

    fn start_with(
        sluice: &Value,
        with_secret: bool,
        tweak: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Rig {
        require_wasm();
        let stable = Upstream::start("stable").unwrap();
        let canary = Upstream::start("canary").unwrap();
        let secret = with_secret.then(|| Upstream::start("admin_secret").unwrap());
        let mut cfg = EnvoyConfig::from_json(sluice)
            .upstream("shop_v1", &stable)
            .upstream("shop_v2", &canary);
        if let Some(s) = &secret {
            cfg = cfg.upstream("admin_secret", s);
        }
        let envoy = Envoy::start(&tweak(cfg)).unwrap_or_else(|e| panic!("{e}"));
        Rig {
            stable,
            canary,
            secret,
            envoy,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        self.envoy.settled_wasm_metric(name).unwrap().unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
struct Req {
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn shop() -> Req {
        Req {
            host: "shop.local".into(),
            path: "/".into(),
            headers: Vec::new(),
        }
    }
    fn path(mut self, path: &str) -> Req {
        self.path = path.into();
        self
    }
    fn host(mut self, host: &str) -> Req {
        self.host = host.into();
        self
    }
    fn h(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn user(self, id: &str) -> Req {
        self.h("x-user-id", id)
    }
}

/// Send `reqs` over `conns` keep-alive connections in parallel (request i on
/// connection i % conns); responses in request order.
fn send_all(envoy: &Envoy, conns: usize, reqs: &[Req]) -> Vec<Response> {
    let conns = conns.max(1);
    let mut out: Vec<Option<Response>> = vec![None; reqs.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|t| {
                let mut client = envoy.client().with_timeout(Duration::from_secs(10));
                s.spawn(move || {
                    let mut got = Vec::new();
                    for (i, r) in reqs.iter().enumerate().skip(t).step_by(conns) {
                        let h: Vec<(&str, &str)> = r
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let resp = client
                            .get(&r.host, &r.path, &h)
                            .unwrap_or_else(|e| panic!("request {i} {r:?} failed: {e}"));
                        got.push((i, resp));
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().unwrap() {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter().map(Option::unwrap).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Stable,
    Canary,
}

/// Which side served a response; panics on anything but a 200 from one of
/// the two shop upstreams.
fn side(r: &Response) -> Side {
    match (r.status, r.upstream()) {
        (200, Some("stable")) => Side::Stable,
        (200, Some("canary")) => Side::Canary,
        _ => panic!(
            "expected a 200 from stable or canary, got {} from {:?}: {:?}",
            r.status,
            r.upstream(),
            r.body_text()
        ),
    }
}

fn canary_share(sides: &[Side]) -> f64 {
    let n = sides.iter().filter(|s| **s == Side::Canary).count();
    100.0 * n as f64 / sides.len() as f64
}

fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Side each user lands on with the given extra headers.
fn sides_of(envoy: &Envoy, ids: &[String], extra: &[(&str, &str)]) -> Vec<Side> {
    let reqs: Vec<Req> = ids
        .iter()
        .map(|id| {
            let mut r = Req::shop().user(id);
            for (k, v) in extra {
                r = r.h(k, v);
            }
            r
        })
        .collect();
    send_all(envoy, 4, &reqs).iter().map(side).collect()
}

// ---------------------------------------------------------------------------

#[test]
fn header_rules_force_canary_or_stable() {
    let rig = Rig::start(&shop_config(50.0));
    let ids = users("hdr", 200);

    let baseline = sides_of(&rig.envoy, &ids, &[]);
    assert!(
        baseline.contains(&Side::Stable) && baseline.contains(&Side::Canary),
        "at weight 50 both sides should get users"
    );
    let always = sides_of(&rig.envoy, &ids, &[("x-canary", "always")]);
    assert!(
        always.iter().all(|s| *s == Side::Canary),
        "x-canary: always must go to canary for every user"
    );
    let never = sides_of(&rig.envoy, &ids, &[("x-canary", "never")]);
    assert!(
        never.iter().all(|s| *s == Side::Stable),
        "x-canary: never must go to stable for every user"
    );
    // A value no rule names falls through to the weighted split.
    let other = sides_of(&rig.envoy, &ids, &[("x-canary", "sometimes")]);
    assert_eq!(
        other, baseline,
        "an unmatched rule value must not change routing"
    );

    assert_eq!(rig.metric("sluice.shop.rule.0.matched"), 200);
    assert_eq!(rig.metric("sluice.shop.rule.1.matched"), 200);
    assert_eq!(rig.canary.requests() + rig.stable.requests(), 800);
}

#[test]
fn cookie_rule_sends_beta_users_to_canary() {
    // Weight 0: only a rule can send anyone to canary.
    let rig = Rig::start(&shop_config(0.0));
    let cases: &[(&str, Side)] = &[
        ("beta=yes", Side::Canary),
        ("session=abc; beta=yes; theme=dark", Side::Canary),
        ("beta=yes; session=abc", Side::Canary),
        ("beta=no", Side::Stable),
        ("notbeta=yes", Side::Stable),
        ("beta=yesplease", Side::Stable),
        ("session=beta", Side::Stable),
    ];
    let reqs: Vec<Req> = cases
        .iter()
        .enumerate()
        .map(|(i, (cookie, _))| Req::shop().user(&format!("ck-{i}")).h("cookie", cookie))
        .collect();
    let got = send_all(&rig.envoy, 1, &reqs);
    for ((cookie, want), r) in cases.iter().zip(&got) {
        assert_eq!(side(r), *want, "cookie {cookie:?}");
    }
    let no_cookie = sides_of(&rig.envoy, &users("ck", 100), &[]);
    assert!(
        no_cookie.iter().all(|s| *s == Side::Stable),
        "weight 0 without a rule → stable"
    );
    assert_eq!(rig.metric("sluice.shop.rule.2.matched"), 3);
}

#[test]
fn rules_apply_in_order_first_match_wins() {
    // Weight 100: everyone is canary unless a rule says otherwise. Rule 1
    // (x-canary: never → stable) comes before rule 2 (beta cookie → canary)
    // and rule 3 (mobile → weight 50), so it must win over both.
    let rig = Rig::start(&shop_config(100.0));
    let ids = users("order", 50);
    let never_beta = sides_of(
        &rig.envoy,
        &ids,
        &[("x-canary", "never"), ("cookie", "beta=yes")],
    );
    assert!(never_beta.iter().all(|s| *s == Side::Stable));
    let never_mobile = sides_of(
        &rig.envoy,
        &ids,
        &[("x-canary", "never"), ("user-agent", IPHONE)],
    );
    assert!(never_mobile.iter().all(|s| *s == Side::Stable));
    assert_eq!(rig.metric("sluice.shop.rule.1.matched"), 100);
    assert_eq!(rig.metric("sluice.shop.rule.2.matched"), 0);
    assert_eq!(rig.metric("sluice.shop.rule.3.matched"), 0);
}

#[test]
fn device_rule_gives_mobile_users_their_own_weight() {
    // Service weight 10; the device rule gives mobile user agents weight 50.
    let rig = Rig::start(&shop_config(10.0));
    let ids = users("dev", 2000);
    let desktop: Vec<Side> = ids
        .chunks(1000)
        .zip([DESKTOP_CHROME, DESKTOP_FIREFOX])
        .flat_map(|(chunk, ua)| sides_of(&rig.envoy, chunk, &[("user-agent", ua)]))
        .collect();
    let mobile: Vec<Side> = ids
        .chunks(1000)
        .zip([IPHONE, ANDROID_PHONE])
        .flat_map(|(chunk, ua)| sides_of(&rig.envoy, chunk, &[("user-agent", ua)]))
        .collect();
    let (d, m) = (canary_share(&desktop), canary_share(&mobile));
    assert!(
        (d - 10.0).abs() <= 3.0,
        "desktop canary share {d:.1}%, want 10±3"
    );
    assert!(
        (m - 50.0).abs() <= 4.0,
        "mobile canary share {m:.1}%, want 50±4"
    );
    // Same sticky bucket, higher weight: a user who is canary on desktop is
    // canary on mobile too.
    for (i, (ds, ms)) in desktop.iter().zip(&mobile).enumerate() {
        assert!(
            !(*ds == Side::Canary && *ms == Side::Stable),
            "user {} is canary at weight 10 (desktop) but stable at weight 50 (mobile)",
            ids[i]
        );
    }
    assert_eq!(rig.metric("sluice.shop.rule.3.matched"), 2000);
}

#[test]
fn weighted_split_matches_weight_over_many_users() {
    let rig = Rig::start(&shop_config(30.0));
    let ids = users("split", 4000);
    let sides = sides_of(&rig.envoy, &ids, &[("user-agent", DESKTOP_CHROME)]);
    let share = canary_share(&sides);
    eprintln!("weight 30: canary share {share:.2}% over 4000 users");
    assert!(
        (share - 30.0).abs() <= 3.0,
        "canary share {share:.2}%, want 30±3"
    );
    let canary = sides.iter().filter(|s| **s == Side::Canary).count() as u64;
    assert_eq!(rig.canary.requests(), canary);
    assert_eq!(rig.stable.requests(), 4000 - canary);
}

#[test]
fn weights_0_and_100_are_absolute() {
    let cfg = json!({
        "services": [shop_service("none", "none.local", 0.0), shop_service("all", "all.local", 100.0)]
    });
    let rig = Rig::start(&cfg);
    let ids = users("abs", 500);
    let reqs: Vec<Req> = ids
        .iter()
        .flat_map(|id| {
            [
                Req::shop().host("none.local").user(id),
                Req::shop().host("all.local").user(id),
            ]
        })
        .collect();
    let got = send_all(&rig.envoy, 4, &reqs);
    for (r, resp) in reqs.iter().zip(&got) {
        let want = if r.host == "all.local" {
            Side::Canary
        } else {
            Side::Stable
        };
        assert_eq!(side(resp), want, "{r:?}");
    }
    assert_eq!(rig.metric("sluice.none.routed.stable"), 500);
    assert_eq!(rig.metric("sluice.all.routed.canary"), 500);
}

#[test]
fn authority_and_path_prefix_select_the_service() {
    let cfg = json!({
        "services": [
            {"name": "api", "match": {"authority": "api.local", "path_prefix": "/v2/"},
             "stable": "shop_v1", "canary": "shop_v2", "weight": 100},
            shop_service("shop", "shop.local", 0.0)
        ]
    });
    let rig = Rig::start(&cfg);
    let cases = [
        // (host, path, served by, counted as)
        ("api.local", "/v2/items", Side::Canary, "api"),
        ("api.local", "/v2/items?q=1", Side::Canary, "api"),
        ("api.local", "/v1/items", Side::Stable, "unmatched"),
        ("api.local", "/", Side::Stable, "unmatched"),
        ("shop.local", "/v2/items", Side::Stable, "shop"),
        // An explicit port and letter case do not change the authority.
        ("api.local:10000", "/v2/items", Side::Canary, "api"),
        ("API.Local", "/v2/items", Side::Canary, "api"),
        ("shop.local:8080", "/", Side::Stable, "shop"),
        ("other.local", "/v2/items", Side::Stable, "unmatched"),
    ];
    let reqs: Vec<Req> = cases
        .iter()
        .map(|(h, p, _, _)| Req::shop().host(h).path(p).user("u1"))
        .collect();
    let got = send_all(&rig.envoy, 1, &reqs);
    for ((h, p, want, _), r) in cases.iter().zip(&got) {
        assert_eq!(side(r), *want, "{h}{p}");
    }
    let count = |who: &str| cases.iter().filter(|c| c.3 == who).count() as u64;
    assert_eq!(rig.metric("sluice.api.routed.canary"), count("api"));
    assert_eq!(rig.metric("sluice.shop.routed.stable"), count("shop"));
    assert_eq!(rig.metric("sluice.unmatched"), count("unmatched"));
}

#[test]
fn device_classes_tablet_and_bot_are_recognised() {
    let mut cfg = shop_config(50.0);
    cfg["services"][0]["rules"] = json!([
        {"device": "tablet", "to": "canary"},
        {"device": "bot", "to": "stable"},
        {"device": "desktop", "to": "stable"}
    ]);
    let rig = Rig::start(&cfg);
    let ids = users("cls", 60);
    let ipad = "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
                (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
    let android_tablet = "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 \
                          (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
    let googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    for (ua, want) in [
        (ipad, Side::Canary),
        (android_tablet, Side::Canary),
        (googlebot, Side::Stable),
        (DESKTOP_CHROME, Side::Stable),
    ] {
        let got = sides_of(&rig.envoy, &ids, &[("user-agent", ua)]);
        assert!(
            got.iter().all(|s| *s == want),
            "{ua}: want all {want:?}, got {got:?}"
        );
    }
    // A phone is none of these: it falls through to the weight (50).
    let phone = sides_of(&rig.envoy, &ids, &[("user-agent", IPHONE)]);
    assert!(phone.contains(&Side::Stable) && phone.contains(&Side::Canary));
    assert_eq!(rig.metric("sluice.shop.rule.0.matched"), 120);
    assert_eq!(rig.metric("sluice.shop.rule.1.matched"), 60);
    assert_eq!(rig.metric("sluice.shop.rule.2.matched"), 60);
}

#[test]
fn users_stick_to_one_side_across_connections_and_workers() {
    let rig = Rig::start(&shop_config(50.0));
    // Open connections until both workers have accepted some (the kernel
    // spreads them by hash; 64 tries make a miss vanishingly unlikely).
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(sluice_envoy::Client::connect(rig.envoy.addr()).unwrap());
        if clients.len() >= 8 {
            let per_worker = rig.envoy.worker_connections().unwrap();
            if per_worker.len() >= 2 && per_worker.values().all(|n| *n > 0) {
                break;
            }
        }
    }
    let per_worker = rig.envoy.worker_connections().unwrap();
    assert!(
        per_worker.len() >= 2 && per_worker.values().all(|n| *n > 0),
        "connections did not reach both workers: {per_worker:?}"
    );

    // 300 users, 6 requests each, every request on a different connection
    // than the user's previous one.
    let ids = users("sticky", 300);
    let n_conn = clients.len();
    let mut seen: HashMap<&str, BTreeSet<Side>> = HashMap::new();
    let mut conns_per_user: HashMap<&str, BTreeSet<usize>> = HashMap::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(c, client)| {
                let ids = &ids;
                s.spawn(move || {
                    let mut got = Vec::new();
                    for round in 0..6 {
                        for (u, id) in ids.iter().enumerate() {
                            if (u + round) % n_conn == c {
                                let r =
                                    client.get("shop.local", "/", &[("x-user-id", id)]).unwrap();
                                got.push((id.as_str(), c, side(&r)));
                            }
                        }
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (id, c, sd) in h.join().unwrap() {
                seen.entry(id).or_default().insert(sd);
                conns_per_user.entry(id).or_default().insert(c);
            }
        }
    });
    assert_eq!(seen.len(), 300);
    let flipped: Vec<_> = seen.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(flipped.is_empty(), "users seen on both sides: {flipped:?}");
    assert!(conns_per_user.values().all(|c| c.len() >= 2.min(n_conn)));
    let sides: Vec<Side> = seen.values().map(|s| *s.iter().next().unwrap()).collect();
    let share = canary_share(&sides);
    assert!(
        (share - 50.0).abs() <= 12.0,
        "share {share:.1}% far from 50"
    );
}

#[test]
fn raising_the_weight_only_moves_users_from_stable_to_canary() {
    // Two Envoys side by side, weight 10 and weight 40, same upstreams.
    require_wasm();
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let start = |w: f64| {
        let cfg = EnvoyConfig::from_json(&shop_config(w))
            .upstream("shop_v1", &stable)
            .upstream("shop_v2", &canary);
        Envoy::start(&cfg).unwrap_or_else(|e| panic!("{e}"))
    };
    let (at10, at40) = (start(10.0), start(40.0));
    let ids = users("mono", 2000);
    let s10 = sides_of(&at10, &ids, &[("user-agent", DESKTOP_CHROME)]);
    let s40 = sides_of(&at40, &ids, &[("user-agent", DESKTOP_CHROME)]);
    let moved_back: Vec<&String> = ids
        .iter()
        .zip(s10.iter().zip(&s40))
        .filter(|(_, (a, b))| **a == Side::Canary && **b == Side::Stable)
        .map(|(id, _)| id)
        .collect();
    assert!(
        moved_back.is_empty(),
        "{} users canary at weight 10 but stable at 40, e.g. {:?}",
        moved_back.len(),
        &moved_back[..moved_back.len().min(5)]
    );
    let (c10, c40) = (canary_share(&s10), canary_share(&s40));
    assert!((c10 - 10.0).abs() <= 3.0, "weight 10 share {c10:.1}%");
    assert!((c40 - 40.0).abs() <= 3.0, "weight 40 share {c40:.1}%");
    assert!(c40 > c10);
}

#[test]
fn forged_steering_header_never_picks_the_cluster() {
    // Weight 0 so the filter's choice is always stable (shop_v1); the
    // Envoy also has a real cluster the config never names.
    let rig = Rig::start_with(&shop_config(0.0), true, |c| c);
    let secret = rig.secret.as_ref().unwrap();
    let forged = [
        "admin_secret",
        "some_other_cluster",
        "shop_v2",
        "",
        "ADMIN_SECRET",
    ];
    let mut reqs = Vec::new();
    for (i, f) in forged.iter().enumerate() {
        let id = format!("forger-{i}");
        reqs.push(Req::shop().user(&id).h("x-sluice-cluster", f));
        reqs.push(Req::shop().user(&id).h("X-Sluice-Cluster", f));
        // The header twice.
        reqs.push(
            Req::shop()
                .user(&id)
                .h("x-sluice-cluster", f)
                .h("x-sluice-cluster", "admin_secret"),
        );
        // A request that matches no service: no steering header may survive
        // either, so it takes the fallback route (stable).
        reqs.push(Req::shop().host("elsewhere.local").h("x-sluice-cluster", f));
    }
    let got = send_all(&rig.envoy, 2, &reqs);
    for (r, resp) in reqs.iter().zip(&got) {
        assert_eq!(side(resp), Side::Stable, "{r:?} → {:?}", resp.upstream());
    }
    assert_eq!(secret.requests(), 0, "a forged header reached admin_secret");
    // What reached the stable upstream carried the filter's own choice (or,
    // unmatched, no steering header at all), never the forged value.
    for rec in rig.stable.recorded() {
        let host = rec.header("host").unwrap_or("");
        let steer: Vec<&str> = rec
            .headers
            .iter()
            .filter(|(k, _)| k == "x-sluice-cluster")
            .map(|(_, v)| v.as_str())
            .collect();
        if host == "shop.local" {
            assert_eq!(
                steer,
                ["shop_v1"],
                "steering header at the upstream: {rec:?}"
            );
        } else {
            assert!(
                steer.is_empty(),
                "unmatched request kept a steering header: {rec:?}"
            );
        }
    }
    assert_eq!(rig.canary.requests(), 0);
    assert_eq!(rig.metric("sluice.unmatched"), forged.len() as u64);
}

#[test]
fn the_steering_header_arrives_with_the_chosen_cluster() {
    let rig = Rig::start(&shop_config(50.0));
    let sides = sides_of(&rig.envoy, &users("arrive", 200), &[]);
    assert!(sides.contains(&Side::Canary) && sides.contains(&Side::Stable));
    for (up, cluster) in [(&rig.stable, "shop_v1"), (&rig.canary, "shop_v2")] {
        let counts = up.counts_by_header("x-sluice-cluster");
        assert_eq!(
            counts.keys().map(String::as_str).collect::<Vec<_>>(),
            [cluster],
            "{} received {counts:?}",
            up.name()
        );
    }
}

#[test]
fn custom_steering_header_is_used_and_stripped() {
    let mut cfg = shop_config(0.0);
    cfg["steering_header"] = json!("x-route-to");
    let rig = Rig::start_with(&cfg, true, |c| c);
    let reqs = vec![
        Req::shop().user("c1").h("x-canary", "always"),
        Req::shop().user("c2"),
        Req::shop().user("c3").h("x-route-to", "admin_secret"),
        Req::shop()
            .host("elsewhere.local")
            .h("x-route-to", "admin_secret"),
    ];
    let got: Vec<Side> = send_all(&rig.envoy, 1, &reqs).iter().map(side).collect();
    assert_eq!(
        got,
        [Side::Canary, Side::Stable, Side::Stable, Side::Stable]
    );
    assert_eq!(rig.secret.as_ref().unwrap().requests(), 0);
    let seen = rig.canary.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-route-to"), Some("shop_v2"));
}

#[test]
fn metrics_show_up_in_admin_stats() {
    let rig = Rig::start(&shop_config(10.0));
    let mut reqs = Vec::new();
    for i in 0..7 {
        reqs.push(Req::shop().user(&format!("m-a{i}")).h("x-canary", "always"));
    }
    for i in 0..5 {
        reqs.push(Req::shop().user(&format!("m-n{i}")).h("x-canary", "never"));
    }
    for i in 0..4 {
        reqs.push(Req::shop().user(&format!("m-b{i}")).h("cookie", "beta=yes"));
    }
    for i in 0..3 {
        reqs.push(Req::shop().user(&format!("m-m{i}")).h("user-agent", IPHONE));
    }
    for i in 0..20 {
        reqs.push(
            Req::shop()
                .user(&format!("m-d{i}"))
                .h("user-agent", DESKTOP_FIREFOX),
        );
    }
    for _ in 0..2 {
        reqs.push(Req::shop().host("nothing.local"));
    }
    let got = send_all(&rig.envoy, 2, &reqs);
    let matched = 7 + 5 + 4 + 3 + 20;
    let canary = got[..matched]
        .iter()
        .filter(|r| side(r) == Side::Canary)
        .count() as u64;

    rig.envoy.await_sluice_tick();
    let m: BTreeMap<String, u64> = rig.envoy.wasm_metrics().unwrap();
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no metric {k} in {m:?}"))
    };
    assert_eq!(get("sluice.shop.rule.0.matched"), 7);
    assert_eq!(get("sluice.shop.rule.1.matched"), 5);
    assert_eq!(get("sluice.shop.rule.2.matched"), 4);
    assert_eq!(get("sluice.shop.rule.3.matched"), 3);
    assert_eq!(get("sluice.shop.routed.canary"), canary);
    assert_eq!(get("sluice.shop.routed.stable"), matched as u64 - canary);
    assert_eq!(get("sluice.unmatched"), 2);
    // The same numbers through the raw /stats text.
    let raw = rig.envoy.admin_get("/stats").unwrap().body_text();
    assert!(raw.contains(&format!("wasmcustom.sluice.shop.routed.canary: {canary}\n")));
}

#[test]
fn config_with_weight_150_is_refused_at_startup() {
    require_wasm();
    let mut cfg = shop_config(10.0);
    cfg["services"][0]["weight"] = json!(150);
    let ec = EnvoyConfig::from_json(&cfg)
        .cluster("shop_v1", 1)
        .cluster("shop_v2", 2);
    let want = "services[0].weight: must be between 0 and 100, got 150";

    let (status, log) =
        Envoy::start_expect_exit(&ec, &EnvoyOptions::default(), Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(1), "Envoy should exit 1; log:\n{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(want)).collect();
    assert_eq!(
        lines.len(),
        1,
        "want exactly one line with {want:?}; log:\n{log}"
    );

    let (status, out) = Envoy::validate(&ec).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "--mode validate should exit 1:\n{out}"
    );
    assert!(
        out.contains(want),
        "--mode validate output lacks {want:?}:\n{out}"
    );
}

#[test]
fn config_with_unknown_keys_is_refused_at_startup() {
    require_wasm();
    // A misspelt top-level key, and an unknown key inside a service.
    let mut top = shop_config(10.0);
    top["steering_hedaer"] = json!("x-oops");
    let mut inner = shop_config(10.0);
    inner["services"][0]["colour"] = json!("blue");
    for (cfg, key, path) in [
        (top, "steering_hedaer", ""),
        (inner, "colour", "services[0]"),
    ] {
        let ec = EnvoyConfig::from_json(&cfg)
            .cluster("shop_v1", 1)
            .cluster("shop_v2", 2);
        let (status, log) =
            Envoy::start_expect_exit(&ec, &EnvoyOptions::default(), Duration::from_secs(30))
                .unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "unknown key {key}: Envoy should exit 1; log:\n{log}"
        );
        let hits: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("wasm log") && l.contains(key) && l.contains(path))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "want one filter log line naming {path}/{key}; log:\n{log}"
        );
    }
}

#[test]
fn config_that_is_not_json_is_refused_at_startup() {
    require_wasm();
    let ec = EnvoyConfig::new("{\"services\": [").cluster("shop_v1", 1);
    let (status, log) =
        Envoy::start_expect_exit(&ec, &EnvoyOptions::default(), Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(
        log.contains("wasm log"),
        "the filter should say why; log:\n{log}"
    );
}

#[test]
fn example_config_validates() {
    require_wasm();
    let root = sluice_envoy::repo_root();
    let yaml = std::fs::read_to_string(root.join("envoy/examples/sluice.yaml")).unwrap();
    // The example loads the wasm by a path relative to the repo root; point
    // it at the wasm under test.
    let yaml = yaml.replace(
        "target/wasm32-wasip1/release/sluice.wasm",
        &sluice_envoy::wasm_path().to_string_lossy(),
    );
    let (status, out) = Envoy::validate_yaml(&yaml, Some(&root)).unwrap();
    assert!(
        status.success(),
        "examples/sluice.yaml does not validate:\n{out}"
    );
}
