//! Reloading config.toml under load: a price and the TLS certificate change
//! (by `POST /admin/reload` and by SIGHUP) while requests keep flowing, and
//! not one of them fails; a bad file changes nothing.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use simd_json::prelude::*;
use support::*;

const FLUX: &str = r#"{"prompt":"a red fox","image_size":"square_hd"}"#;

/// A new CA and a leaf for localhost and 127.0.0.1 signed by it, as PEM files in `dir`.
fn new_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "reload test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("new-ca.pem"),
        dir.join("new-cert.pem"),
        dir.join("new-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

/// The credits one request is charged now.
async fn credits_now(server: &Server, key: &str) -> u64 {
    let resp = client()
        .request(post(
            &server.url("/fal-ai/flux/dev"),
            Some(key),
            "application/json",
            FLUX,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.headers()["x-billing-credits-used"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether a fresh TLS connection trusting only `ca` gets an answer.
async fn handshake_trusting(server: &Server, ca: &Path) -> bool {
    let url = format!("https://localhost:{}/healthz", server.tls.port());
    tls_client_trusting(false, ca)
        .request(get(&url, None))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prices_and_certificates_change_under_load_without_a_failed_request() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(repo_path("certs/dev-cert.pem"), &cert).unwrap();
    std::fs::copy(repo_path("certs/dev-key.pem"), &key_file).unwrap();
    let (new_ca, new_cert, new_key) = new_certificate(dir.path());
    let both_cas = dir.path().join("both-cas.pem");
    let dev_ca = std::fs::read_to_string(repo_path("certs/dev-ca.pem")).unwrap();
    std::fs::write(
        &both_cas,
        dev_ca + &std::fs::read_to_string(&new_ca).unwrap(),
    )
    .unwrap();

    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    opts.tls_files = Some((cert.clone(), key_file.clone()));
    let config_path = dir.path().join("config.toml");
    let original = opts.render(dir.path());
    std::fs::write(&config_path, &original).unwrap();
    let key = create_key(&config_path, "acme", 10_000_000);
    let server = Server::start_config(dir, config_path.clone());
    assert_eq!(credits_now(&server, &key).await, 28);
    assert!(
        !handshake_trusting(&server, &new_ca).await,
        "the new certificate is served already"
    );

    // Load: plain and TLS clients, every answer recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|i| {
            let (stop, key, both_cas) = (stop.clone(), key.clone(), both_cas.clone());
            let url = match i % 2 {
                0 => server.url("/fal-ai/flux/dev"),
                _ => format!("https://localhost:{}/fal-ai/flux/dev", server.tls.port()),
            };
            tokio::spawn(async move {
                let (plain, tls) = (client(), tls_client_trusting(false, &both_cas));
                let mut answers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let req = post(&url, Some(&key), "application/json", FLUX);
                    let sent = if i % 2 == 0 {
                        plain.request(req).await
                    } else {
                        tls.request(req).await
                    };
                    let resp =
                        sent.unwrap_or_else(|e| panic!("request failed during reloads: {e}"));
                    let credits = resp
                        .headers()
                        .get("x-billing-credits-used")
                        .map(|v| v.to_str().unwrap().to_owned());
                    answers.push((resp.status().as_u16(), credits));
                    body(resp).await;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A new price and a new certificate, by the admin API.
    let edited = original
        .replace("usd = 0.025", "usd = 0.05")
        .replace(&cert.display().to_string(), &new_cert.display().to_string())
        .replace(
            &key_file.display().to_string(),
            &new_key.display().to_string(),
        );
    std::fs::write(&config_path, &edited).unwrap();
    assert_eq!(reload(&server).await, (200, json(br#"{"reloaded":true}"#)));
    assert_eq!(credits_now(&server, &key).await, 55); // 1 MP × $0.05 × 1.1
    assert!(
        handshake_trusting(&server, &new_ca).await,
        "the new certificate is not served"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another price, by SIGHUP.
    std::fs::write(&config_path, edited.replace("usd = 0.05", "usd = 0.1")).unwrap();
    server.signal("HUP");
    let applied = eventually(Duration::from_secs(5), || async {
        credits_now(&server, &key).await == 110
    })
    .await;
    assert!(applied, "SIGHUP did not reload");

    // A bad file is refused with its reason, and nothing changes.
    std::fs::write(&config_path, "[billing\nmargin = oops").unwrap();
    let (status, refused) = reload(&server).await;
    assert_eq!(status, 400);
    assert!(
        refused.get_str("detail").unwrap().contains("config"),
        "{refused}"
    );
    std::fs::write(&config_path, edited.replace("usd = 0.05", "usd = -1")).unwrap();
    assert_eq!(reload(&server).await.0, 400);
    assert_eq!(credits_now(&server, &key).await, 110);
    assert!(handshake_trusting(&server, &new_ca).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    assert!(answers.len() > 50, "too little load: {}", answers.len());
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "a request failed during the reloads"
    );
    for price in ["28", "55", "110"] {
        assert!(
            answers.iter().any(|(_, c)| c.as_deref() == Some(price)),
            "no request charged {price} under load"
        );
    }
    // Log lines reach stderr in batches, up to 50 ms late.
    let logged = eventually(Duration::from_secs(5), || async {
        server.stderr_log().contains("reload refused")
    })
    .await;
    assert!(logged, "the refusal was not logged");
}
