//! Several nodes on one PostgreSQL: each spends only credit it has leased
//! from the database, so together they never spend more than the account
//! has, and its last credits can be spent through any of them.

mod support;

use std::time::Duration;

use simd_json::prelude::*;
use support::*;

struct Cluster {
    mock: MockFal,
    nodes: Vec<Server>,
    key: String,
}

/// `n` nodes on a fresh PostgreSQL, and a key of an account with `credits`.
async fn cluster(n: usize, credits: i64) -> Cluster {
    cluster_with(Setup::new(n, credits)).await
}

async fn cluster_on_plans(n: usize, credits: i64, plans: &str) -> Cluster {
    cluster_with(Setup {
        plans,
        ..Setup::new(n, credits)
    })
    .await
}

struct Setup<'a> {
    nodes: usize,
    credits: i64,
    plans: &'a str,
    refresh_interval_ms: u64,
    /// The database's URL as each node reaches it (the first for any node
    /// past the list).
    urls: Vec<String>,
    /// `[cluster]` settings besides the node's name.
    lease: &'a str,
}

impl Setup<'_> {
    fn new(nodes: usize, credits: i64) -> Self {
        Self {
            nodes,
            credits,
            plans: UNLIMITED_PLANS,
            refresh_interval_ms: 250,
            urls: vec![pg::database()],
            lease: "lease_credits = 10\nlease_ttl_secs = 2\n",
        }
    }
}

async fn cluster_with(setup: Setup<'_>) -> Cluster {
    let mock = MockFal::start(None).await.unwrap();
    let Setup {
        nodes: n,
        credits,
        plans,
        refresh_interval_ms,
        urls,
        lease,
    } = setup;
    let options = |i: usize| {
        let mut opts = Options::new(mock.url(false));
        opts.plans = plans.to_owned();
        // The mock's upscaler answers 4 MP whatever it was asked: a cost above its hold.
        opts.pricing = format!(
            "{TEST_PRICING}\n[[pricing]]\nmodel = \"fal-ai/upscale/*\"\nunit = \"megapixel\"\nusd = 0.01\n"
        );
        opts.reconcile_interval_secs = 1;
        opts.refresh_interval_ms = refresh_interval_ms;
        opts.store_url = Some(urls.get(i - 1).unwrap_or(&urls[0]).clone());
        // Calls at fal may outlive a takeover (several seconds here).
        opts.timeout_secs = 30;
        opts.cluster = format!("[cluster]\nnode = \"node-{i}\"\n{lease}");
        opts
    };
    let (first, key) = Server::start_with_key(options(1), "acme", credits);
    let mut nodes = vec![first];
    nodes.extend((2..=n).map(|i| Server::start(options(i))));
    Cluster { mock, nodes, key }
}

/// `/mock/canned`: priced by the catch-all rule, 2 credits a request.
async fn spread(cluster: &Cluster, requests: usize) -> Vec<u16> {
    spread_keys(cluster, std::slice::from_ref(&cluster.key), requests).await
}

/// `requests` at once, round the nodes and round `keys`.
async fn spread_keys(cluster: &Cluster, keys: &[String], requests: usize) -> Vec<u16> {
    let nodes = &cluster.nodes;
    concurrently((0..requests).map(|i| {
        let url = nodes[i % nodes.len()].url("/mock/canned");
        (url, keys[i % keys.len()].clone())
    }))
    .await
}

/// A call to each `(url, key)`, all at once: their statuses, in order.
async fn concurrently(calls: impl Iterator<Item = (String, String)>) -> Vec<u16> {
    let calls: Vec<_> = calls
        .map(|(url, key)| {
            tokio::spawn(async move {
                client()
                    .request(post(&url, Some(&key), "application/json", "{}"))
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let mut statuses = Vec::with_capacity(calls.len());
    for call in calls {
        statuses.push(call.await.unwrap());
    }
    statuses
}

fn served(cluster: &Cluster) -> usize {
    cluster
        .mock
        .seen()
        .iter()
        .filter(|s| s.target == "/mock/canned")
        .count()
}

/// Credit still leased to nodes, by the store.
fn leased(server: &Server) -> i64 {
    server.query("SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM leases")[0]
        .get(0)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spend_exactly_the_balance_and_no_more() {
    let cluster = cluster(3, 74).await;
    let statuses = spread(&cluster, 200).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 402).count();
    assert_eq!((ok, refused), (37, 163), "{statuses:?}");
    assert_eq!(served(&cluster), 37);
    assert!(books_close(&cluster.nodes[0], &[("acme", 74)]).await);
    assert_eq!(leased(&cluster.nodes[0]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_credit_goes_back_and_a_stopped_node_returns_its_lease() {
    let mut cluster = cluster(2, 1000).await;
    // One request through node 1 leases more than it needs (10 beyond).
    assert_eq!(spread(&cluster, 1).await, [200]);
    assert!(leased(&cluster.nodes[0]) > 0);
    // Every node, and the CLI, report the account as the database has it:
    // what is leased to a node is not available to the others. (Leased 12,
    // less the 2 charged once the charge is written.)
    assert!(
        eventually(Duration::from_secs(5), || async {
            leased(&cluster.nodes[0]) == 10
        })
        .await
    );
    let config = &cluster.nodes[1].config;
    let shown = String::from_utf8(cli(config, &["accounts", "show", "acme"]).stdout).unwrap();
    assert!(
        shown.contains("balance   998 credits") && shown.contains("leased    10 credits"),
        "{shown}"
    );
    let resp = client()
        .request(get(
            &cluster.nodes[1].url("/v1/account"),
            Some(&cluster.key),
        ))
        .await
        .unwrap();
    let view = json(&body(resp).await);
    assert_eq!(
        (
            view.get_i64("balance"),
            view.get_i64("leased"),
            view.get_i64("available")
        ),
        (Some(998), Some(10), Some(988))
    );
    // Idle for `lease_idle_secs`, it goes back.
    assert!(
        eventually(Duration::from_secs(10), || async {
            leased(&cluster.nodes[0]) == 0
        })
        .await,
        "unused credit stayed leased"
    );
    assert_eq!(spread(&cluster, 4).await, [200; 4]);
    for node in &mut cluster.nodes {
        node.signal("TERM");
        assert!(node.wait().success());
    }
    assert_eq!(leased(&cluster.nodes[0]), 0);
    assert!(books_close(&cluster.nodes[0], &[("acme", 10)]).await);
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// A key's 30 a minute hold across the nodes together, and so does an
/// account's cap across its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_nodes() {
    let plans = "[plans.free]\nrequests_per_minute = 30\n[plans.capped]\nrequests_per_minute = 1000\naccount_requests_per_minute = 30\n";
    let cluster = cluster_on_plans(3, 100_000, plans).await;
    let statuses = spread(&cluster, 100).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (30, 70));

    let config = &cluster.nodes[0].config;
    let first = create_key(config, "capped", 100_000);
    assert!(cli(config, &["accounts", "plan", "capped", "capped"])
        .status
        .success());
    let second = create_key(config, "capped", 0);
    let keys = [first.clone(), second.clone()];
    // Every node knows both keys and the plan before the burst.
    for node in &cluster.nodes {
        for key in &keys {
            assert!(
                eventually(Duration::from_secs(5), || async {
                    let resp = client()
                        .request(get(&node.url("/v1/account"), Some(key)))
                        .await
                        .unwrap();
                    resp.status() == 200
                })
                .await
            );
        }
    }
    let statuses = spread_keys(&cluster, &keys, 100).await;
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (30, 70),
        "{statuses:?}"
    );
    assert!(books_close(&cluster.nodes[0], &[("acme", 60), ("capped", 60)]).await);
}

/// Rows of `sql`'s first column, as integers.
fn number(server: &Server, sql: &str) -> i64 {
    server.query(sql)[0].get(0).unwrap()
}

/// A node killed with requests in flight and a job pending, and left down:
/// a peer charges its unsettled holds at their held amount (the job's too,
/// ending it) and frees its lease, after the lease TTL (2 s here), and
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_down_is_taken_over_by_a_peer() {
    let mut cluster = cluster(2, 1000).await;
    let url = cluster.nodes[1].url("/mock/slow/5000");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (url, key) = (url.clone(), cluster.key.clone());
            tokio::spawn(async move {
                let _ = client()
                    .request(post(&url, Some(&key), "application/json", "{}"))
                    .await;
            })
        })
        .collect();
    // And a queued job, pending when the node goes: no one else would settle it.
    let resp = call(
        &cluster.nodes[1],
        &cluster.key,
        "/queue/fal-ai/flux/dev",
        "{}",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let node = &cluster.nodes[0];
            number(node, "SELECT COUNT(*) FROM holds WHERE node = 'node-2'") == 5
                && number(node, "SELECT COUNT(*) FROM jobs") == 1
        })
        .await,
        "the holds never reached the database"
    );
    cluster.nodes[1].kill();
    let first = &cluster.nodes[0];
    for call in calls {
        let _ = call.await;
    }
    assert!(
        eventually(Duration::from_secs(15), || async {
            number(first, "SELECT COUNT(*) FROM holds") == 0
                && number(
                    first,
                    "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM leases WHERE node = 'node-2'",
                ) == 0
        })
        .await,
        "the silent node's holds and lease were never taken over"
    );
    assert!(books_close(first, &[("acme", 8 + 28)]).await);
    assert_eq!(
        number(first, "SELECT COUNT(*) FROM jobs WHERE state = 'charged'"),
        1
    );
    let served = spread_to(first, &cluster.key, 3).await;
    assert_eq!(served, [200; 3]);
    assert!(books_close(first, &[("acme", 8 + 28 + 6)]).await);
}

/// A node killed mid-load and started again settles its own holds: every
/// request fal served is charged, nothing twice, and the books close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_recovers_on_restart() {
    let mut cluster = cluster(2, 10_000).await;
    let load = tokio::spawn({
        let urls: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.url("/mock/canned"))
            .collect();
        let key = cluster.key.clone();
        async move {
            let calls: Vec<_> = (0..60)
                .map(|i| {
                    let (url, key) = (urls[i % 2].clone(), key.clone());
                    tokio::spawn(async move {
                        let _ = client()
                            .request(post(&url, Some(&key), "application/json", "{}"))
                            .await;
                    })
                })
                .collect();
            for call in calls {
                let _ = call.await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.nodes[1].kill();
    load.await.unwrap();
    cluster.nodes[1].restart();
    let served = served(&cluster) as i64;
    let first = &cluster.nodes[0];
    assert!(
        eventually(Duration::from_secs(10), || async {
            let b = books(first)[0].1;
            b.balance() && b.charged % 2 == 0 && (2 * served..=120).contains(&b.charged)
        })
        .await,
        "served {served}: {:?}",
        books(first)
    );
}

async fn spread_to(node: &Server, key: &str, requests: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..requests {
        let resp = client()
            .request(post(
                &node.url("/mock/canned"),
                Some(key),
                "application/json",
                "{}",
            ))
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    statuses
}

/// A job submitted through one node is polled through another and fetched
/// through a third, by its owner only, and charged once: by the node that
/// holds its credits, when it reads the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_belongs_to_the_cluster() {
    let mut cluster = cluster(3, 1000).await;
    let key = &cluster.key;
    let resp = call(&cluster.nodes[0], key, "/queue/fal-ai/flux/dev", "{}").await;
    assert_eq!(resp.status(), 200);
    let fal_id = json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned();
    let status = format!("/fal-ai/queue/requests/{fal_id}");
    let result = format!("/queue/fal-ai/flux/requests/{fal_id}");
    // Seen by the other nodes once its node's writer has committed it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            [200, 202].contains(&get_on(&cluster.nodes[1], &status, key).await)
        })
        .await
    );
    // A node that starts again takes up its own pending jobs, not this one.
    cluster.nodes[1].restart();
    let stranger = create_key(&cluster.nodes[0].config, "stranger", 10);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_on(&cluster.nodes[1], &result, &stranger).await != 401
        })
        .await
    );
    assert_eq!(get_on(&cluster.nodes[1], &status, &stranger).await, 404);
    assert_eq!(get_on(&cluster.nodes[2], &result, &stranger).await, 404);
    let mut fetched = false;
    for _ in 0..10 {
        let _ = get_on(&cluster.nodes[1], &status, key).await;
        if get_on(&cluster.nodes[2], &result, key).await == 200 {
            fetched = true;
            break;
        }
    }
    assert!(fetched, "the result never came through node 3");
    assert_eq!(get_on(&cluster.nodes[2], &result, key).await, 200);
    assert!(books_close(&cluster.nodes[0], &[("acme", 28)]).await);
    // Charged from the lease of the node that held it, no other: once idle,
    // every lease is given back whole.
    assert!(
        eventually(Duration::from_secs(15), || async {
            number(
                &cluster.nodes[0],
                "SELECT COUNT(*) FROM leases WHERE credits <> 0",
            ) == 0
        })
        .await,
        "credit stranded in a lease"
    );
}

/// The status of a GET of `path` through `node` with `key`.
async fn get_on(node: &Server, path: &str, key: &str) -> u16 {
    client()
        .request(get(&node.url(path), Some(key)))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A cost above its hold comes out of the account's free credit once, not
/// out of the node's lease as well: the other nodes can then spend only
/// what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_above_its_hold_is_not_spent_twice() {
    let cluster = cluster(2, 60).await;
    // Held 1 MP (11 credits), charged 4 MP (44): the balance is 16.
    let resp = call(
        &cluster.nodes[0],
        &cluster.key,
        "/fal-ai/upscale/x",
        r#"{"image_size":{"width":1024,"height":1024}}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(15), || async {
            leased(&cluster.nodes[0]) == 0
        })
        .await,
        "node 1's lease was never given back whole"
    );
    let statuses = spread_to(&cluster.nodes[1], &cluster.key, 10).await;
    assert_eq!(count(&statuses, 200), 8, "{statuses:?}");
    assert!(books_close(&cluster.nodes[0], &[("acme", 44 + 16)]).await);
}

/// A key disabled through one node's CLI is refused by every node when the
/// edit commits: by notification, the change feed's poll being an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_node_at_once() {
    let cluster = cluster_with(Setup {
        refresh_interval_ms: 3_600_000,
        ..Setup::new(3, 1000)
    })
    .await;
    let key = &cluster.key;
    for node in &cluster.nodes {
        assert_eq!(spread_to(node, key, 1).await, [200]);
    }
    let id: i64 = number(&cluster.nodes[0], "SELECT MAX(id) FROM api_keys");
    assert!(cli(
        &cluster.nodes[0].config,
        &["keys", "disable", &id.to_string()]
    )
    .status
    .success());
    for node in &cluster.nodes {
        assert!(
            eventually(Duration::from_secs(5), || async {
                get_on(node, "/v1/account", key).await == 403
            })
            .await,
            "a node still takes the key"
        );
    }
    assert_eq!(spread_to(&cluster.nodes[2], key, 1).await, [403]);
}

/// `requests` at once to `node` with `key`: their statuses.
async fn burst_to(node: &Server, key: &str, requests: usize) -> Vec<u16> {
    let url = node.url("/mock/canned");
    concurrently((0..requests).map(|_| (url.clone(), key.to_owned()))).await
}

/// The database goes away under two nodes (`link` says how): each goes on
/// serving from what it has leased, deciding a key's rate limit alone on
/// its share (half the rate and burst, from where the database left it),
/// refuses billable requests with 503 `ledger_unavailable` once its lease
/// is fenced (half the TTL unheard), and serves again by itself once the
/// database is back (`back` says how). Every request fal served is charged
/// once.
async fn ride_out(link: cut::Link, back: cut::Link) {
    let (relay, url) = relayed(&pg::database()).await;
    let plans =
        "[plans.free]\nrequests_per_minute = 100000\n[plans.strict]\nrequests_per_minute = 30\n";
    let cluster = cluster_with(Setup {
        plans,
        urls: vec![url],
        // Nothing given back for being idle: what is leased stays to ride on.
        lease: "lease_credits = 200\nlease_idle_secs = 600\nlease_ttl_secs = 10\n",
        ..Setup::new(2, 100_000)
    })
    .await;
    let config = &cluster.nodes[0].config;
    let strict = create_key(config, "strict", 100_000);
    assert!(cli(config, &["accounts", "plan", "strict", "strict"])
        .status
        .success());
    // Requests answered 200, per account: acme, strict.
    let mut paid = [0usize; 2];
    // Each node leases for both accounts, and learns the plan and where the
    // database has the key (2 of its 30 taken).
    for node in &cluster.nodes {
        assert!(
            eventually(Duration::from_secs(5), || async {
                let resp = client()
                    .request(get(&node.url("/v1/account"), Some(&strict)))
                    .await
                    .unwrap();
                resp.status() == 200 && json(&body(resp).await).get_str("plan") == Some("strict")
            })
            .await
        );
        assert_eq!(spread_to(node, &cluster.key, 1).await, [200]);
        assert_eq!(spread_to(node, &strict, 1).await, [200]);
        paid = [paid[0] + 1, paid[1] + 1];
    }
    // Two heartbeats, so that each node counts the other.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    relay.set(link);
    let (one, two) = tokio::join!(
        burst_to(&cluster.nodes[0], &strict, 40),
        burst_to(&cluster.nodes[1], &strict, 40)
    );
    for statuses in [&one, &two] {
        let ok = count(statuses, 200);
        assert!(
            (1..=15).contains(&ok) && ok + count(statuses, 429) == 40,
            "{statuses:?}"
        );
        paid[1] += ok;
    }
    // Served from the lease until fenced, then refused, and nothing between.
    let first = &cluster.nodes[0];
    let before_fence = std::cell::Cell::new(0);
    let refused = eventually(Duration::from_secs(30), || async {
        let resp = call(first, &cluster.key, "/mock/canned", "{}").await;
        match resp.status().as_u16() {
            200 => {
                before_fence.set(before_fence.get() + 1);
                false
            }
            status => {
                assert_eq!(status, 503);
                let error = json(&body(resp).await);
                assert_eq!(error.get_str("error_type"), Some("ledger_unavailable"));
                true
            }
        }
    })
    .await;
    assert!(
        refused,
        "a node without its database never stopped spending"
    );
    paid[0] += before_fence.get();

    relay.set(back);
    for node in &cluster.nodes {
        assert!(
            serves_again(node, &cluster.key).await,
            "a node did not come back with its database"
        );
        paid[0] += 1;
    }
    assert_eq!(served(&cluster), paid[0] + paid[1]);
    assert!(all_written(first, paid[0] + paid[1]).await);
    assert!(
        books_close(
            first,
            &[("acme", 2 * paid[0] as i64), ("strict", 2 * paid[1] as i64)]
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_a_database_that_refuses_them() {
    ride_out(cut::Link::Refused, cut::Link::Open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_a_database_that_goes_silent() {
    ride_out(cut::Link::Frozen, cut::Link::Open).await;
}

/// Back, but every connection the nodes had stays silent for good: each
/// node drops them past their deadlines and connects again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_leave_connections_that_never_answer_again() {
    ride_out(cut::Link::Frozen, cut::Link::Back).await;
}

/// A relay in front of `database`, and the URL that goes through it.
async fn relayed(database: &str) -> (cut::Relay, String) {
    let port = database
        .split(':')
        .nth(2)
        .and_then(|rest| rest.split('/').next())
        .unwrap();
    let relay = cut::Relay::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let url = database.replace(&format!(":{port}/"), &format!(":{}/", relay.addr.port()));
    (relay, url)
}

/// One node cut off from the database while its peer is not: it serves
/// from its lease until fenced, its peer takes it over (charging the hold
/// of a call still at fal at its held amount), and once back it writes
/// what it served and the call's real outcome. fal failed that call, so
/// its charge goes back to nothing: the books close on what was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_alone_settles_what_its_peer_took_over() {
    let database = pg::database();
    let (relay, cut_off) = relayed(&database).await;
    let cluster = cluster_with(Setup {
        urls: vec![cut_off, database],
        lease: "lease_credits = 100\nlease_idle_secs = 600\nlease_ttl_secs = 6\n",
        ..Setup::new(2, 10_000)
    })
    .await;
    let (first, peer) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut paid = 0;
    assert_eq!(spread_to(first, &cluster.key, 1).await, [200]);
    paid += 1;
    assert!(
        eventually(Duration::from_secs(5), || async {
            number(peer, "SELECT COUNT(*) FROM charges") == 1
        })
        .await
    );
    // A call that fal will fail, slowly: its hold reaches the database.
    let (url, key) = (first.url("/mock/slow/8000/500"), cluster.key.clone());
    let failing = tokio::spawn(async move {
        client()
            .request(post(&url, Some(&key), "application/json", "{}"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            number(peer, "SELECT COUNT(*) FROM holds WHERE node = 'node-1'") == 1
        })
        .await
    );
    relay.set(cut::Link::Refused);
    // Served from the lease, recorded only in the node's journal for now.
    assert_eq!(spread_to(first, &cluster.key, 3).await, [200; 3]);
    paid += 3;
    assert!(
        eventually(Duration::from_secs(20), || async {
            number(
                peer,
                "SELECT COUNT(*) FROM charges WHERE outcome = 'recovered'",
            ) == 1
        })
        .await,
        "the peer never took the silent node over"
    );
    relay.set(cut::Link::Open);
    // fal's failure reaches the client as a bad gateway, and is not charged.
    assert_eq!(failing.await.unwrap(), 502);
    assert!(
        serves_again(first, &cluster.key).await,
        "the node did not come back"
    );
    paid += 1;
    assert_eq!(served(&cluster), paid);
    assert!(all_written(peer, paid).await);
    assert!(books_close(peer, &[("acme", 2 * paid as i64)]).await);
    assert_eq!(
        number(
            peer,
            "SELECT COUNT(*) FROM charges WHERE outcome = 'recovered'"
        ),
        0
    );
}

/// Once the database has a charge for each of the `answered` calls: books
/// read before could close by chance, a wrong charge standing in for one
/// not yet written.
async fn all_written(server: &Server, answered: usize) -> bool {
    eventually(Duration::from_secs(10), || async {
        number(
            server,
            "SELECT COUNT(*) FROM charges WHERE outcome = 'charged'",
        ) == answered as i64
    })
    .await
}

/// Once `node` answers a priced call with 200 again (each try is a call fal
/// serves, so a 200 is one more to charge).
async fn serves_again(node: &Server, key: &str) -> bool {
    eventually(Duration::from_secs(30), || async {
        call(node, key, "/mock/canned", "{}").await.status() == 200
    })
    .await
}
