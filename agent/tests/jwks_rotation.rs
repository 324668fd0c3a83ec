//! Key rotation, issuer outage and unknown-`kid` floods against a real
//! JWKS HTTP server on 127.0.0.1 port 0.
//!
//! Requests are verified the way the proxy does it: verify, and on
//! `unknown_key` ask the issuer's key store for a rate-limited refetch and
//! verify once more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hyper::StatusCode;
use serde_json::{json, Value};
use tokengate::config::IssuerConfig;
use tokengate::decision::Reason;
use tokengate::jwks::IssuerKeys;
use tokengate::verify::Verifier;
use tokio::sync::watch;

#[path = "support/lib.rs"]
mod support;

use support::http::ReplyServer;
use support::tokens::{jwks_document, sign_with_kid, unix_now};

const ISS: &str = "https://idp.example";

/// Upper bound on waiting for a condition, so a broken refresh fails the
/// test instead of hanging it.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// Pause between two verifications of the continuous traffic.
const REQUEST_GAP: Duration = Duration::from_millis(20);

/// Signs a token from [`ISS`], valid for an hour, with fixture key
/// `key_name` under a header naming `kid`.
fn token(key_name: &str, kid: &str) -> String {
    let now = unix_now();
    let claims = json!({"iss": ISS, "sub": "alice", "iat": now, "exp": now + 3600});
    sign_with_kid(key_name, kid, &claims)
}

fn old_token() -> String {
    token("rsa-1", "rsa-1")
}

fn new_token() -> String {
    token("ec-1", "ec-1")
}

fn issuer(uri: &str, changes: &Value) -> Result<IssuerConfig> {
    let mut config = json!({
        "issuer": ISS,
        "jwks_uri": uri,
        "algorithms": ["RS256", "ES256"],
    });
    for (name, value) in changes.as_object().expect("object") {
        config[name] = value.clone();
    }
    serde_json::from_value(config).context("issuer config")
}

/// Verifies `token` as the proxy does: one rate-limited refetch and one
/// retry on `unknown_key`.
async fn verify_like_proxy(
    verifier: &Verifier,
    keys: &IssuerKeys,
    token: &str,
) -> Result<(), Reason> {
    match verifier.verify(token, unix_now()) {
        Ok(_) => Ok(()),
        Err(failure) if failure.reason == Reason::UnknownKey => {
            let kid = failure.kid.unwrap_or_default();
            if !keys.refetch_for_unknown_kid(&kid).await {
                return Err(Reason::UnknownKey);
            }
            verifier
                .verify(token, unix_now())
                .map(|_| ())
                .map_err(|failure| failure.reason)
        }
        Err(failure) => Err(failure.reason),
    }
}

/// Verifies each of `tokens` every [`REQUEST_GAP`] for `duration`, and
/// returns every failure with the phase name.
async fn traffic(
    phase: &str,
    verifier: &Verifier,
    keys: &IssuerKeys,
    tokens: &[&str],
    duration: Duration,
) -> Vec<String> {
    let mut failures = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        for (index, token) in tokens.iter().enumerate() {
            if let Err(reason) = verify_like_proxy(verifier, keys, token).await {
                failures.push(format!("{phase}: token {index} rejected with {reason:?}"));
            }
        }
        tokio::time::sleep(REQUEST_GAP).await;
    }
    failures
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !condition() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: each phase of the rotation reads best in sequence"
)]
async fn rotation_and_outage_cost_no_request() -> Result<()> {
    let server = ReplyServer::start(jwks_document(&["rsa-1"])).await;
    let config = issuer(
        &server.url("/jwks.json"),
        &json!({
            "jwks_refresh_seconds": 1,
            "jwks_max_stale_seconds": 4,
            "unknown_kid_refetch_seconds": 1,
            "jwks_timeout_seconds": 1,
        }),
    )?;
    let keys = Arc::new(IssuerKeys::new(config));
    let verifier = Verifier::new(vec![Arc::clone(&keys)]);
    let (stop, shutdown) = watch::channel(false);
    let refresh = tokio::spawn(Arc::clone(&keys).run(shutdown));
    wait_until("first fetch", || keys.is_ready()).await?;
    let (old, new) = (old_token(), new_token());
    let mut failures = Vec::new();

    // The old key alone.
    failures.extend(
        traffic(
            "old key only",
            &verifier,
            &keys,
            &[&old],
            Duration::from_millis(500),
        )
        .await,
    );

    // The issuer publishes the new key beside the old one and starts
    // signing with it at once, before the agent's next refresh.
    server.set(StatusCode::OK, jwks_document(&["rsa-1", "ec-1"]));
    failures.extend(
        traffic(
            "both keys",
            &verifier,
            &keys,
            &[&old, &new],
            Duration::from_millis(1500),
        )
        .await,
    );

    // The issuer is down, then slow, then returns invalid JSON. The last
    // good keys stay in force within the tolerated staleness.
    server.set(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    failures.extend(
        traffic(
            "issuer down",
            &verifier,
            &keys,
            &[&old, &new],
            Duration::from_millis(1200),
        )
        .await,
    );
    server.set_delayed(
        StatusCode::OK,
        jwks_document(&["rsa-1", "ec-1"]),
        Duration::from_secs(3),
    );
    failures.extend(
        traffic(
            "issuer slow",
            &verifier,
            &keys,
            &[&old, &new],
            Duration::from_millis(1200),
        )
        .await,
    );
    server.set(StatusCode::OK, "<html>maintenance</html>");
    failures.extend(
        traffic(
            "issuer garbage",
            &verifier,
            &keys,
            &[&old, &new],
            Duration::from_millis(500),
        )
        .await,
    );
    let during_outage = keys.stats();

    // Recovery, then the old key is withdrawn once no token uses it.
    server.set(StatusCode::OK, jwks_document(&["rsa-1", "ec-1"]));
    wait_until("fresh set after the outage", || !keys.stats().stale).await?;
    server.set(StatusCode::OK, jwks_document(&["ec-1"]));
    wait_until("old key withdrawn", || keys.key_count() == 1).await?;
    failures.extend(
        traffic(
            "new key only",
            &verifier,
            &keys,
            &[&new],
            Duration::from_millis(500),
        )
        .await,
    );
    let withdrawn = verify_like_proxy(&verifier, &keys, &old).await;

    assert!(
        failures.is_empty(),
        "{} failed requests:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        during_outage.stale,
        "the set is stale during the outage: {during_outage:?}"
    );
    assert!(during_outage.fetch_failure >= 2, "{during_outage:?}");
    assert!(
        during_outage
            .key_set_age_seconds
            .is_some_and(|age| age >= 1),
        "{during_outage:?}"
    );
    assert_eq!(
        withdrawn,
        Err(Reason::UnknownKey),
        "a token of the withdrawn key"
    );
    stop.send(true)?;
    tokio::time::timeout(WAIT_LIMIT, refresh).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_dropped_after_max_staleness() -> Result<()> {
    let server = ReplyServer::start(jwks_document(&["rsa-1"])).await;
    let config = issuer(
        &server.url("/jwks.json"),
        &json!({"jwks_refresh_seconds": 1, "jwks_max_stale_seconds": 1, "jwks_timeout_seconds": 1}),
    )?;
    let keys = Arc::new(IssuerKeys::new(config));
    let verifier = Verifier::new(vec![Arc::clone(&keys)]);
    let (_stop, shutdown) = watch::channel(false);
    let refresh = tokio::spawn(Arc::clone(&keys).run(shutdown));
    wait_until("first fetch", || keys.is_ready()).await?;
    let old = old_token();

    server.set(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    wait_until("keys dropped", || !keys.is_ready()).await?;
    let dropped = verifier
        .verify(&old, unix_now())
        .map(|_| ())
        .map_err(|f| f.reason);
    let stats = keys.stats();
    server.set(StatusCode::OK, jwks_document(&["rsa-1"]));
    wait_until("keys back", || keys.is_ready()).await?;
    let recovered = verifier.verify(&old, unix_now()).map(|_| ());

    assert_eq!(dropped, Err(Reason::KeysUnavailable));
    assert_eq!(stats.keys, 0);
    assert!(!stats.stale, "dropped, not stale: {stats:?}");
    assert!(
        stats.key_set_age_seconds.is_some_and(|age| age >= 2),
        "{stats:?}"
    );
    assert!(recovered.is_ok(), "{recovered:?}");
    refresh.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kid_flood_is_rate_limited() -> Result<()> {
    const FLOOD: usize = 500;
    let server = ReplyServer::start(jwks_document(&["rsa-1"])).await;
    let config = issuer(
        &server.url("/jwks.json"),
        &json!({"jwks_refresh_seconds": 3600, "unknown_kid_refetch_seconds": 3600}),
    )?;
    let keys = Arc::new(IssuerKeys::new(config));
    let verifier = Arc::new(Verifier::new(vec![Arc::clone(&keys)]));
    keys.refresh_now().await?;
    assert_eq!(server.hits(), 1);

    let callers: Vec<_> = (0..FLOOD)
        .map(|index| {
            let keys = Arc::clone(&keys);
            let verifier = Arc::clone(&verifier);
            let kid = format!(
                "random-{index}-{:x}",
                unix_now().wrapping_mul(index as u64 + 7)
            );
            tokio::spawn(async move {
                let token = token("rsa-1", &kid);
                verify_like_proxy(&verifier, &keys, &token).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.push(caller.await?);
    }

    let stats = keys.stats();
    assert!(outcomes
        .iter()
        .all(|outcome| *outcome == Err(Reason::UnknownKey)));
    assert_eq!(
        server.hits(),
        2,
        "one initial fetch and at most one refetch"
    );
    assert_eq!(stats.unknown_kid_refetches, 1, "{stats:?}");
    assert_eq!(
        stats.unknown_kid_refetches_limited,
        FLOOD as u64 - 1,
        "{stats:?}"
    );
    assert!(keys.is_ready());
    Ok(())
}
