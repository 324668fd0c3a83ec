//! The verified-token cache: a token seen before costs a SHA-256 and a hash
//! lookup instead of a signature check.
//!
//! Keys are the SHA-256 of the token, so the cache never contains token text.
//! Only tokens that passed verification are stored, each until its `exp`
//! (plus the issuer's clock skew, as the verifier allows). Every hit checks
//! `exp` and `nbf` against the clock again. When any issuer's key set
//! changes, the whole cache is dropped, so a token signed with a withdrawn
//! key is verified again. Revocation is not decided here: the caller checks
//! every token, cached or not, against the revocation list in force.
//!
//! Size is bounded by `max_entries`, with CLOCK eviction (a one-bit
//! approximation of least-recently-used): a hit sets the entry's reference
//! bit under a shared lock, and an insert into a full cache sweeps a hand
//! that clears set bits and evicts the first entry whose bit is clear or
//! whose token has expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest as _, Sha256};

use crate::config::CacheConfig;
use crate::jwks::{IssuerKeys, KeySet};
use crate::verify::{VerifiedToken, Verifier};

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

/// Returns the SHA-256 of `token`, the cache key.
pub fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The cache shared by every workload's request path.
pub struct TokenCache {
    enabled: bool,
    max_entries: usize,
    table: RwLock<Table>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Numbers about the cache, read by the metrics module at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
}

/// The result of [`TokenCache::lookup`]: the cached token on a hit, and on a
/// miss what [`TokenCache::insert`] needs to store the verified token.
#[derive(Debug)]
pub struct Lookup {
    /// `None` when the cache is disabled.
    digest: Option<TokenDigest>,
    /// Table generation seen before verification. An insert into a newer
    /// generation is dropped, because the key sets changed meanwhile.
    generation: u64,
    /// Shared with the cache entry, so a hit copies no claims.
    hit: Option<Arc<VerifiedToken>>,
}

impl Lookup {
    /// Returns the cached token on a hit.
    pub fn hit(&self) -> Option<&VerifiedToken> {
        self.hit.as_deref()
    }

    /// Takes the cached token out, on a hit.
    pub fn take_hit(&mut self) -> Option<Arc<VerifiedToken>> {
        self.hit.take()
    }
}

struct Table {
    index: HashMap<TokenDigest, usize>,
    slots: Vec<Slot>,
    /// Next slot the CLOCK hand examines.
    hand: usize,
    /// Incremented at every clear.
    generation: u64,
    /// The key stores whose changes clear the table.
    issuers: Vec<Arc<IssuerKeys>>,
    /// Each issuer's key set when the table was last cleared, in the order
    /// of `issuers`. Holding the `Arc`s keeps their addresses from being
    /// reused, so pointer equality means "same set".
    key_sets: Vec<Option<Arc<KeySet>>>,
}

struct Slot {
    digest: TokenDigest,
    entry: Arc<Entry>,
    referenced: AtomicBool,
}

struct Entry {
    token: Arc<VerifiedToken>,
    /// First Unix second at which the verifier rejects the token as
    /// expired: `exp + skew`.
    expires_at: u64,
    /// First Unix second at which the verifier accepts the token's `nbf`:
    /// `nbf - skew`; 0 without `nbf`.
    valid_from: u64,
}

impl Entry {
    fn is_valid_at(&self, now: u64) -> bool {
        now < self.expires_at && now >= self.valid_from
    }
}

impl TokenCache {
    /// Creates an empty cache that tracks the key sets of `issuers`.
    pub fn new(config: &CacheConfig, issuers: Vec<Arc<IssuerKeys>>) -> Self {
        let key_sets = issuers.iter().map(|keys| keys.keys()).collect();
        Self {
            enabled: config.enabled && config.max_entries > 0,
            max_entries: config.max_entries,
            table: RwLock::new(Table {
                index: HashMap::new(),
                slots: Vec::new(),
                hand: 0,
                generation: 0,
                issuers,
                key_sets,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// True unless `cache.enabled` is false.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Looks `token` up at `now` (Unix seconds). A hit needs an entry whose
    /// `exp` and `nbf` still hold at `now`, and key sets unchanged since it
    /// was stored. A disabled cache returns a miss without hashing and
    /// counts nothing.
    pub fn lookup(&self, token: &str, now: u64) -> Lookup {
        if !self.enabled {
            return Lookup {
                digest: None,
                generation: 0,
                hit: None,
            };
        }
        self.lookup_digest(token_digest(token), now)
    }

    /// Looks up the token whose SHA-256 is `digest`, for a caller that has
    /// hashed it already (the request path also needs the digest for the
    /// token's fingerprint). Otherwise the same as [`TokenCache::lookup`].
    pub fn lookup_digest(&self, digest: TokenDigest, now: u64) -> Lookup {
        if !self.enabled {
            return Lookup {
                digest: None,
                generation: 0,
                hit: None,
            };
        }

        let (generation, found) = {
            let table = self.read_current_table();
            let found = table.index.get(&digest).map(|&slot| {
                let slot = &table.slots[slot];
                slot.referenced.store(true, Ordering::Relaxed);
                Arc::clone(&slot.entry)
            });
            (table.generation, found)
        };

        let hit = match found {
            Some(entry) if entry.is_valid_at(now) => Some(Arc::clone(&entry.token)),
            Some(_) => {
                self.remove(&digest, now);
                None
            }
            None => None,
        };
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);

        Lookup {
            digest: Some(digest),
            generation,
            hit,
        }
    }

    /// Stores `token`, which `verifier` accepted after `lookup` missed.
    ///
    /// Nothing is stored when the cache is disabled, when the token has no
    /// numeric `exp` (it would never leave), or when it is no longer valid at
    /// `now`. Nothing is stored either when a key set changed since `lookup`,
    /// or when `verifier` uses another key store for the issuer than the
    /// cache tracks, as a verifier from before a configuration reload does.
    pub fn insert(&self, lookup: &Lookup, token: &VerifiedToken, verifier: &Verifier, now: u64) {
        let Some(digest) = lookup.digest else {
            return;
        };
        let Some(exp) = numeric_date_floor(token, "exp") else {
            return;
        };
        let nbf = numeric_date_ceil(token, "nbf");

        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.clear_if_keys_changed();
        if table.generation != lookup.generation {
            return;
        }
        let Some(tracked) = table
            .issuers
            .iter()
            .find(|keys| keys.config.issuer == token.issuer)
        else {
            return;
        };
        let verified_by_tracked = verifier
            .issuer_keys(&token.issuer)
            .is_some_and(|used| Arc::ptr_eq(used, tracked));
        if !verified_by_tracked {
            return;
        }
        let skew = tracked.config.clock_skew_seconds;
        let entry = Entry {
            token: Arc::new(token.clone()),
            expires_at: exp.saturating_add(skew),
            valid_from: nbf.map_or(0, |nbf| nbf.saturating_sub(skew)),
        };
        if entry.is_valid_at(now) {
            table.insert(digest, Arc::new(entry), self.max_entries, now);
        }
    }

    /// Drops every entry.
    pub fn clear(&self) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.clear();
    }

    /// Tracks `issuers` from now on in place of the previous key stores and
    /// drops every entry, because a configuration reload may have changed
    /// what verification accepts (audiences, algorithms, skew).
    pub fn replace_issuers(&self, issuers: Vec<Arc<IssuerKeys>>) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.key_sets = issuers.iter().map(|keys| keys.keys()).collect();
        table.issuers = issuers;
        table.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let entries = self
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .len();
        CacheStats {
            entries,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Returns the table under a read lock, after dropping its entries if a
    /// key set changed since they were stored.
    fn read_current_table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        if table.key_sets_match() {
            return table;
        }
        drop(table);

        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.clear_if_keys_changed();
        drop(table);
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove(&self, digest: &TokenDigest, now: u64) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(&slot) = table.index.get(digest) {
            // Another request may have stored a fresh entry meanwhile.
            if !table.slots[slot].entry.is_valid_at(now) {
                table.remove_slot(slot);
            }
        }
    }
}

impl Table {
    fn key_sets_match(&self) -> bool {
        self.issuers
            .iter()
            .zip(&self.key_sets)
            .all(|(keys, seen)| same_set(keys.keys().as_ref(), seen.as_ref()))
    }

    fn clear_if_keys_changed(&mut self) {
        if self.key_sets_match() {
            return;
        }
        let dropped = self.slots.len();
        self.clear();
        self.key_sets = self.issuers.iter().map(|keys| keys.keys()).collect();
        tracing::debug!(
            cache.dropped = dropped,
            "token cache cleared after a key set change"
        );
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.hand = 0;
        self.generation += 1;
    }

    fn insert(&mut self, digest: TokenDigest, entry: Arc<Entry>, max_entries: usize, now: u64) {
        if let Some(&slot) = self.index.get(&digest) {
            self.slots[slot].entry = entry;
            return;
        }
        if self.slots.len() >= max_entries {
            let victim = self.find_victim(now);
            self.remove_slot(victim);
        }
        self.index.insert(digest, self.slots.len());
        self.slots.push(Slot {
            digest,
            entry,
            referenced: AtomicBool::new(false),
        });
    }

    /// Sweeps the CLOCK hand: an expired entry or one whose reference bit is
    /// clear is the victim, and a set bit is cleared on the way. Two turns
    /// always find one, because the first turn clears every bit.
    fn find_victim(&mut self, now: u64) -> usize {
        let len = self.slots.len();
        for _ in 0..2 * len {
            let slot = self.hand % len;
            self.hand = (slot + 1) % len;
            let candidate = &self.slots[slot];
            if !candidate.entry.is_valid_at(now)
                || !candidate.referenced.swap(false, Ordering::Relaxed)
            {
                return slot;
            }
        }
        self.hand % len
    }

    /// Removes `slot` by moving the last slot into its place.
    fn remove_slot(&mut self, slot: usize) {
        let removed = self.slots.swap_remove(slot);
        self.index.remove(&removed.digest);
        if let Some(moved) = self.slots.get(slot) {
            self.index.insert(moved.digest, slot);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }
}

fn same_set(current: Option<&Arc<KeySet>>, seen: Option<&Arc<KeySet>>) -> bool {
    match (current, seen) {
        (Some(current), Some(seen)) => Arc::ptr_eq(current, seen),
        (None, None) => true,
        _ => false,
    }
}

/// Reads the `NumericDate` claim `name` rounded down: an `exp` read this way
/// ends the entry no later than the verifier would.
fn numeric_date_floor(token: &VerifiedToken, name: &str) -> Option<u64> {
    let number = token.claims.get(name)?.as_number()?;
    if let Some(seconds) = number.as_u64() {
        return Some(seconds);
    }
    let seconds = number.as_f64()?;
    #[expect(
        clippy::cast_sign_loss,
        reason = "negative values saturate to 0, and `as` saturates above u64::MAX"
    )]
    Some(seconds.floor().max(0.0) as u64)
}

/// Reads the `NumericDate` claim `name` rounded up: an `nbf` read this way
/// starts the entry no earlier than the verifier would.
fn numeric_date_ceil(token: &VerifiedToken, name: &str) -> Option<u64> {
    let number = token.claims.get(name)?.as_number()?;
    if let Some(seconds) = number.as_u64() {
        return Some(seconds);
    }
    let seconds = number.as_f64()?;
    #[expect(
        clippy::cast_sign_loss,
        reason = "negative values saturate to 0, and `as` saturates above u64::MAX"
    )]
    Some(seconds.ceil().max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::config::IssuerConfig;

    const ISS: &str = "https://idp.example";
    const NOW: u64 = 1_700_000_000;
    const SKEW: u64 = 60;

    const JWKS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/jwks.json"
    ));

    fn issuer_keys() -> Arc<IssuerKeys> {
        let config: IssuerConfig = serde_yaml::from_str(&format!(
            "issuer: {ISS}\njwks_uri: http://127.0.0.1:9/jwks\nalgorithms: [RS256]\nclock_skew_seconds: {SKEW}\n"
        ))
        .expect("issuer config");
        let keys = IssuerKeys::new(config);
        keys.replace_keys(key_set(3));
        Arc::new(keys)
    }

    /// Returns a key set with the first `count` keys of the fixture JWKS.
    fn key_set(count: usize) -> KeySet {
        let mut document: Value = serde_json::from_str(JWKS).expect("fixture JSON");
        document["keys"]
            .as_array_mut()
            .expect("keys")
            .truncate(count);
        KeySet::from_jwks_json(document.to_string().as_bytes())
            .expect("fixture keys")
            .0
    }

    /// Creates a cache over one issuer's key store and returns both.
    fn cache(max_entries: usize) -> (TokenCache, Arc<IssuerKeys>) {
        let keys = issuer_keys();
        let config = CacheConfig {
            enabled: true,
            max_entries,
        };
        (TokenCache::new(&config, vec![Arc::clone(&keys)]), keys)
    }

    /// Returns the verifier over the key stores that `cache` tracks.
    fn verifier_of(cache: &TokenCache) -> Verifier {
        let table = cache.table.read().expect("table lock");
        Verifier::new(table.issuers.clone())
    }

    fn verified(claims: &Value) -> VerifiedToken {
        VerifiedToken {
            issuer: ISS.to_owned(),
            subject: Some("alice".to_owned()),
            kid: Some("rsa-1".to_owned()),
            algorithm: "RS256".to_owned(),
            claims: claims.as_object().expect("object").clone(),
            roles_claim: "roles".to_owned(),
        }
    }

    fn claims(exp: u64) -> Value {
        json!({"iss": ISS, "sub": "alice", "exp": exp})
    }

    /// Looks `token` up and, on a miss, stores `claims` as its verified form.
    fn fill(cache: &TokenCache, token: &str, claims: &Value, now: u64) {
        let lookup = cache.lookup(token, now);
        assert!(lookup.hit().is_none(), "{token} was already cached");
        cache.insert(&lookup, &verified(claims), &verifier_of(cache), now);
    }

    #[test]
    fn hit_after_insert() {
        let (cache, _keys) = cache(10);

        fill(&cache, "token-a", &claims(NOW + 300), NOW);
        let lookup = cache.lookup("token-a", NOW + 1);

        let hit = lookup.hit().expect("a hit");
        assert_eq!(hit.subject.as_deref(), Some("alice"));
        assert_eq!(
            cache.stats(),
            CacheStats {
                entries: 1,
                hits: 1,
                misses: 1
            }
        );
    }

    #[test]
    fn entry_expires_at_exp_plus_skew() {
        let (cache, _keys) = cache(10);
        let exp = NOW + 300;
        fill(&cache, "token-a", &claims(exp), NOW);

        let before = cache.lookup("token-a", exp + SKEW - 1);
        let at = cache.lookup("token-a", exp + SKEW);

        assert!(before.hit().is_some());
        assert!(at.hit().is_none());
        assert_eq!(cache.stats().entries, 0, "the expired entry was removed");
    }

    #[test]
    fn fractional_exp_rounds_down() {
        let (cache, _keys) = cache(10);
        let claims = json!({"iss": ISS, "exp": 1_700_000_010.9_f64});
        fill(&cache, "token-a", &claims, NOW);

        assert!(cache.lookup("token-a", NOW + 10 + SKEW - 1).hit().is_some());
        assert!(cache.lookup("token-a", NOW + 10 + SKEW).hit().is_none());
    }

    #[test]
    fn nbf_is_checked_on_every_hit() {
        let (cache, _keys) = cache(10);
        let nbf = NOW + 100;
        let claims = json!({"iss": ISS, "exp": NOW + 1000, "nbf": nbf});
        // Stored at a time when nbf already holds, then looked up with a
        // clock that went back.
        fill(&cache, "token-a", &claims, nbf);

        assert!(cache.lookup("token-a", nbf - SKEW).hit().is_some());
        assert!(cache.lookup("token-a", nbf - SKEW - 1).hit().is_none());
    }

    #[test]
    fn token_without_exp_is_not_stored() {
        let (cache, _keys) = cache(10);
        let cases = [
            json!({"iss": ISS}),
            json!({"iss": ISS, "exp": "1800000000"}),
        ];

        for claims in cases {
            fill(&cache, "token-a", &claims, NOW);

            assert_eq!(cache.stats().entries, 0, "{claims}");
        }
    }

    #[test]
    fn expired_token_is_not_stored() {
        let (cache, _keys) = cache(10);

        fill(&cache, "token-a", &claims(NOW - SKEW), NOW);

        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn key_set_change_clears_cache() {
        let (cache, keys) = cache(10);
        fill(&cache, "token-a", &claims(NOW + 300), NOW);
        assert!(cache.lookup("token-a", NOW).hit().is_some());

        assert!(keys.replace_keys(key_set(2)), "the set changed");
        let after = cache.lookup("token-a", NOW);

        assert!(after.hit().is_none());
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn unchanged_key_set_keeps_cache() {
        let (cache, keys) = cache(10);
        fill(&cache, "token-a", &claims(NOW + 300), NOW);

        assert!(!keys.replace_keys(key_set(3)), "the same keys");

        assert!(cache.lookup("token-a", NOW).hit().is_some());
    }

    #[test]
    fn insert_after_key_change_is_dropped() {
        let (cache, keys) = cache(10);
        let verifier = verifier_of(&cache);
        let lookup = cache.lookup("token-a", NOW);

        // The key set changes while the token is being verified.
        keys.replace_keys(key_set(1));
        cache.insert(&lookup, &verified(&claims(NOW + 300)), &verifier, NOW);

        assert_eq!(cache.stats().entries, 0);
        assert!(cache.lookup("token-a", NOW).hit().is_none());
    }

    #[test]
    fn size_is_bounded() {
        let (cache, _keys) = cache(4);

        for index in 0..20 {
            fill(&cache, &format!("token-{index}"), &claims(NOW + 300), NOW);
        }

        assert_eq!(cache.stats().entries, 4);
        assert!(
            cache.lookup("token-19", NOW).hit().is_some(),
            "the newest entry stays"
        );
    }

    #[test]
    fn clock_keeps_recently_used_entries() {
        let (cache, _keys) = cache(3);
        for name in ["a", "b", "c"] {
            fill(&cache, name, &claims(NOW + 300), NOW);
        }

        // `a` is used, so the hand passes it and evicts `b`; then `a` again
        // survives the next eviction, which takes `c`.
        assert!(cache.lookup("a", NOW).hit().is_some());
        fill(&cache, "d", &claims(NOW + 300), NOW);
        assert!(cache.lookup("a", NOW).hit().is_some());
        fill(&cache, "e", &claims(NOW + 300), NOW);

        for (name, kept) in [
            ("a", true),
            ("b", false),
            ("c", false),
            ("d", true),
            ("e", true),
        ] {
            assert_eq!(cache.lookup(name, NOW).hit().is_some(), kept, "{name}");
        }
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let (cache, _keys) = cache(3);
        fill(&cache, "short", &claims(NOW + 10), NOW);
        fill(&cache, "long-1", &claims(NOW + 300), NOW);
        fill(&cache, "long-2", &claims(NOW + 300), NOW);
        for name in ["short", "long-1", "long-2"] {
            assert!(cache.lookup(name, NOW).hit().is_some(), "{name}");
        }

        let later = NOW + 10 + SKEW;
        fill(&cache, "new", &claims(NOW + 300), later);

        for (name, kept) in [("long-1", true), ("long-2", true), ("new", true)] {
            assert_eq!(cache.lookup(name, later).hit().is_some(), kept, "{name}");
        }
    }

    #[test]
    fn clear_drops_entries() {
        let (cache, _keys) = cache(10);
        fill(&cache, "token-a", &claims(NOW + 300), NOW);

        cache.clear();

        assert_eq!(cache.stats().entries, 0);
        assert!(cache.lookup("token-a", NOW).hit().is_none());
    }

    #[test]
    fn replace_issuers_clears_and_tracks_new_keys() {
        let (cache, _old_keys) = cache(10);
        fill(&cache, "token-a", &claims(NOW + 300), NOW);
        let new_keys = issuer_keys();

        cache.replace_issuers(vec![Arc::clone(&new_keys)]);
        assert!(cache.lookup("token-a", NOW).hit().is_none());
        fill(&cache, "token-a", &claims(NOW + 300), NOW);
        assert!(cache.lookup("token-a", NOW).hit().is_some());
        new_keys.replace_keys(key_set(1));

        assert!(cache.lookup("token-a", NOW).hit().is_none());
    }

    #[test]
    fn token_of_unknown_issuer_is_not_stored() {
        let (cache, _keys) = cache(10);
        let lookup = cache.lookup("token-a", NOW);
        let mut token = verified(&claims(NOW + 300));
        token.issuer = "https://removed.example".to_owned();

        cache.insert(&lookup, &token, &verifier_of(&cache), NOW);

        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn token_from_outdated_verifier_is_not_stored() {
        let (cache, _old_keys) = cache(10);
        let old_verifier = verifier_of(&cache);
        cache.replace_issuers(vec![issuer_keys()]);

        // A request that started before the reload finishes afterwards.
        let lookup = cache.lookup("token-a", NOW);
        cache.insert(&lookup, &verified(&claims(NOW + 300)), &old_verifier, NOW);

        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn disabled_cache_stores_and_counts_nothing() {
        let keys = issuer_keys();
        let config = CacheConfig {
            enabled: false,
            max_entries: 10,
        };
        let cache = TokenCache::new(&config, vec![keys]);

        let lookup = cache.lookup("token-a", NOW);
        cache.insert(
            &lookup,
            &verified(&claims(NOW + 300)),
            &verifier_of(&cache),
            NOW,
        );

        assert!(!cache.is_enabled());
        assert!(cache.lookup("token-a", NOW).hit().is_none());
        assert_eq!(cache.stats(), CacheStats::default());
    }
}
