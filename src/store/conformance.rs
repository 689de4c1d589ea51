//! The conformance suite every [`Store`] implementation passes. `tests/store_conformance.rs`
//! runs each case against SQLite and against PostgreSQL (a fresh schema per case).

use super::*;
use chrono::Duration as ChronoDuration;

fn unique_email(tag: &str) -> String {
    format!("{tag}-{}@example.com", new_id("e"))
}

async fn next_event(rx: &mut broadcast::Receiver<StoreEvent>, wanted: impl Fn(&StoreEvent) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return true,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            _ => return false,
        }
    }
}

pub async fn accounts(store: &dyn Store) {
    let a = store.create_account("Ada", &unique_email("ada")).await.expect("create");
    assert!(a.id.starts_with("acct_"));
    assert_eq!(a.status, AccountStatus::Active);
    assert_eq!(store.get_account(&a.id).await.expect("get"), a);

    let email = a.email.clone().expect("email");
    let dup = store.create_account("Ada again", &email.to_uppercase()).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");

    assert_eq!(
        store.get_account("acct_nope").await,
        Err(StoreError::NotFound("account"))
    );

    let b = store.create_account("Bob", &unique_email("bob")).await.expect("create");
    let all = store.list_accounts(100, None).await.expect("list");
    assert!(all.iter().any(|x| x.id == a.id) && all.iter().any(|x| x.id == b.id));
    let first = store.list_accounts(1, None).await.expect("page 1");
    let second = store.list_accounts(1, Some(&first[0].id)).await.expect("page 2");
    assert_eq!((first.len(), second.len()), (1, 1));
    assert!(second[0].id > first[0].id);

    let disabled = store
        .set_account_status(&b.id, AccountStatus::Disabled)
        .await
        .expect("disable");
    assert_eq!(disabled.status, AccountStatus::Disabled);
    assert_eq!(
        store.set_account_status("acct_nope", AccountStatus::Disabled).await,
        Err(StoreError::NotFound("account"))
    );
}

pub async fn keys(store: &dyn Store) {
    let account = store
        .create_account("Keys", &unique_email("keys"))
        .await
        .expect("account");
    let (secret, digest, prefix) = generate_api_key();
    let limits = KeyLimits {
        expires_at: Some(Utc::now() + ChronoDuration::days(30)),
        allowed_models: vec!["gpt-4o-mini".into()],
        rpm_limit: Some(60),
        tpm_limit: Some(10_000),
        budget_nano_usd: Some(5_000_000_000),
    };
    let key = store
        .create_key(&account.id, "ci", digest, &prefix, &limits)
        .await
        .expect("create key");
    assert!(key.id.starts_with("key_"));
    assert_eq!((key.rpm_limit, key.tpm_limit), (Some(60), Some(10_000)));
    assert_eq!(key.allowed_models, ["gpt-4o-mini"]);

    let listed = store.list_keys(&account.id).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].prefix, prefix);
    assert!(
        !format!("{listed:?}").contains(&secret[7..]),
        "the secret is never stored"
    );

    let found = store.find_key(digest).await.expect("find").expect("present");
    assert_eq!(found.key.id, key.id);
    assert_eq!(found.account_status, AccountStatus::Active);
    assert!(found.key.revoked_at.is_none());
    assert_eq!(store.find_key([0; 32]).await.expect("find"), None);

    let at = Utc::now();
    store
        .touch_keys(std::slice::from_ref(&key.id), at)
        .await
        .expect("touch");
    let used = store
        .find_key(digest)
        .await
        .expect("find")
        .expect("present")
        .key
        .last_used_at
        .expect("touched");
    assert!((used - at).num_milliseconds().abs() < 1_000);

    store.revoke_key(&key.id).await.expect("revoke");
    let revoked = store.find_key(digest).await.expect("find").expect("present");
    assert!(revoked.key.revoked_at.is_some());
    assert_eq!(store.revoke_key("key_nope").await, Err(StoreError::NotFound("key")));

    let (_, other_digest, other_prefix) = generate_api_key();
    let none = store
        .create_key("acct_nope", "x", other_digest, &other_prefix, &KeyLimits::default())
        .await;
    assert_eq!(none, Err(StoreError::NotFound("account")));
    store
        .set_account_status(&account.id, AccountStatus::Disabled)
        .await
        .expect("disable");
    let refused = store
        .create_key(&account.id, "x", other_digest, &other_prefix, &KeyLimits::default())
        .await;
    assert!(matches!(refused, Err(StoreError::Invalid(_))), "{refused:?}");
    let record = store.find_key(digest).await.expect("find").expect("present");
    assert_eq!(record.account_status, AccountStatus::Disabled);
}

pub async fn wallets(store: &dyn Store) {
    let account = store
        .create_account("Wallet", &unique_email("wallet"))
        .await
        .expect("account");
    assert_eq!(store.wallet(&account.id).await.expect("wallet").balance_nano_usd, 0);
    let (w, credited) = store
        .credit(&account.id, 12_500_000_000, "admin", "ref-1")
        .await
        .expect("credit");
    assert!(credited);
    assert_eq!(w.balance_nano_usd, 12_500_000_000);
    let (w, credited) = store
        .credit(&account.id, 12_500_000_000, "admin", "ref-1")
        .await
        .expect("replay");
    assert!(!credited, "the same reference credits once");
    assert_eq!(w.balance_nano_usd, 12_500_000_000);
    let (w, _) = store
        .credit(&account.id, 1, "stripe", "ref-1")
        .await
        .expect("other kind");
    assert_eq!(w.balance_nano_usd, 12_500_000_001);
    assert_eq!(
        store.credit("acct_nope", 1, "admin", "r").await,
        Err(StoreError::NotFound("account"))
    );
    assert!(matches!(
        store.credit(&account.id, 0, "admin", "z").await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.wallet("acct_nope").await, Err(StoreError::NotFound("account")));
}

pub async fn provider_keys(store: &dyn Store) {
    let account = store
        .create_account("Byok", &unique_email("byok"))
        .await
        .expect("account");
    let sealed = SealedSecret {
        key_version: "v1".into(),
        nonce: vec![1; 12],
        ciphertext: vec![2; 40],
    };
    store
        .put_provider_key(&account.id, "openai", &sealed)
        .await
        .expect("put");
    assert_eq!(
        store.get_provider_key(&account.id, "openai").await.expect("get"),
        Some(sealed.clone())
    );
    let replaced = SealedSecret {
        key_version: "v2".into(),
        ..sealed
    };
    store
        .put_provider_key(&account.id, "openai", &replaced)
        .await
        .expect("replace");
    let listed = store.list_provider_keys(&account.id).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].provider.as_str(), listed[0].key_version.as_str()),
        ("openai", "v2")
    );
    let all = store.all_provider_keys().await.expect("all");
    assert!(all
        .iter()
        .any(|(a, p, s)| *a == account.id && p == "openai" && s.key_version == "v2"));
    store.delete_provider_key(&account.id, "openai").await.expect("delete");
    assert_eq!(store.get_provider_key(&account.id, "openai").await.expect("get"), None);
    assert_eq!(
        store.delete_provider_key(&account.id, "openai").await,
        Err(StoreError::NotFound("provider key"))
    );
}

pub async fn change_events(store: &dyn Store) {
    let mut rx = store.subscribe();
    let account = store
        .create_account("Events", &unique_email("events"))
        .await
        .expect("account");
    let (_, digest, prefix) = generate_api_key();
    let key = store
        .create_key(&account.id, "k", digest, &prefix, &KeyLimits::default())
        .await
        .expect("key");
    store.revoke_key(&key.id).await.expect("revoke");
    assert!(
        next_event(&mut rx, |e| *e == StoreEvent::Key(digest)).await,
        "revocation announced"
    );
    store
        .set_account_status(&account.id, AccountStatus::Disabled)
        .await
        .expect("disable");
    assert!(
        next_event(&mut rx, |e| *e == StoreEvent::Account(account.id.clone())).await,
        "status announced"
    );
    store
        .credit(&account.id, 5, "admin", &new_id("ref"))
        .await
        .expect("credit");
    assert!(
        next_event(&mut rx, |e| *e == StoreEvent::Wallet(account.id.clone())).await,
        "credit announced"
    );
}

fn usage(
    id: &str,
    account: &str,
    key: Option<&str>,
    cost: i64,
    lease: Option<&str>,
    at: DateTime<Utc>,
) -> crate::usage::UsageRecord {
    crate::usage::UsageRecord {
        request_id: id.into(),
        account_id: account.into(),
        key_id: key.map(str::to_owned),
        created_at: at,
        route: "chat_completions".into(),
        requested_model: Some("gpt-4o-mini".into()),
        routed_model: Some("gpt-4o-mini".into()),
        provider: Some("sim".into()),
        task: None,
        status: 200,
        input_tokens: 10,
        output_tokens: 5,
        cached_tokens: 2,
        reasoning_tokens: 1,
        cost_nano_usd: cost,
        unbilled_nano_usd: 0,
        estimated: false,
        latency_ms: 12,
        ttfb_ms: Some(4),
        cache_hit: false,
        lease_id: lease.map(str::to_owned),
        end_user: None,
    }
}

pub async fn leases(store: &dyn Store) {
    let account = store
        .create_account("Lease", &unique_email("lease"))
        .await
        .expect("account");
    store
        .credit(&account.id, 1_000, "admin", &new_id("ref"))
        .await
        .expect("credit");
    let ttl = Duration::from_secs(30);
    // Under the minimum: nothing is granted.
    let none = store
        .lease(&account.id, "i1", None, 2_000, 2_000, ttl)
        .await
        .expect("lease");
    assert_eq!((none.granted_nano_usd, none.lease_id.as_str()), (0, ""));
    // A quarter of the balance, at least min, at most want.
    let a = store
        .lease(&account.id, "i1", None, 100, 300, ttl)
        .await
        .expect("lease");
    assert_eq!((a.granted_nano_usd, a.balance_nano_usd), (250, 750));
    let b0 = store
        .lease(&account.id, "i2", None, 600, 5_000, ttl)
        .await
        .expect("at least min");
    assert_eq!((b0.granted_nano_usd, b0.balance_nano_usd), (600, 150));
    assert_eq!(
        store.settle_lease(&b0.lease_id, 0).await.expect("give it back"),
        Some(600)
    );
    let grown = store
        .lease(&account.id, "i1", Some(&a.lease_id), 750, 5_000, ttl)
        .await
        .expect("grow");
    assert_eq!(
        (grown.lease_id.as_str(), grown.granted_nano_usd, grown.balance_nano_usd),
        (a.lease_id.as_str(), 750, 0)
    );
    let w = store.wallet(&account.id).await.expect("wallet");
    assert_eq!(
        (w.balance_nano_usd, w.leased_nano_usd),
        (1_000, 1_000),
        "leased money still counts as the account's"
    );
    store.extend_lease(&a.lease_id, ttl).await.expect("extend");
    // Settle (1,000 granted in all): 250 spent, 750 back; a second settle is a no-op.
    assert_eq!(store.settle_lease(&a.lease_id, 250).await.expect("settle"), Some(750));
    assert_eq!(store.settle_lease(&a.lease_id, 250).await.expect("again"), None);
    let w = store.wallet(&account.id).await.expect("wallet");
    assert_eq!((w.balance_nano_usd, w.leased_nano_usd), (750, 0));

    // A lease whose instance vanished: reclaimed keeping what the usage log shows spent; its
    // usage arriving later is billed from the wallet directly.
    let b = store
        .lease(&account.id, "gone", None, 100, 500, Duration::from_millis(1))
        .await
        .expect("lease");
    let now = Utc::now();
    store
        .insert_usage(
            &[usage(&new_id("r"), &account.id, None, 120, Some(&b.lease_id), now)],
            &AlertRules::default(),
        )
        .await
        .expect("usage");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.reclaim_expired_leases(Duration::ZERO).await.expect("reclaim"), 1);
    assert_eq!(
        store.wallet(&account.id).await.expect("wallet").balance_nano_usd,
        750 - 120
    );
    let late = usage(&new_id("r"), &account.id, None, 80, Some(&b.lease_id), now);
    store
        .insert_usage(std::slice::from_ref(&late), &AlertRules::default())
        .await
        .expect("late");
    assert_eq!(
        store.wallet(&account.id).await.expect("wallet").balance_nano_usd,
        750 - 200
    );

    // A disabled account cannot lease.
    store
        .set_account_status(&account.id, AccountStatus::Disabled)
        .await
        .expect("disable");
    assert!(matches!(
        store.lease(&account.id, "i1", None, 1, 1, ttl).await,
        Err(StoreError::Invalid(_))
    ));
}

pub async fn usage_log(store: &dyn Store) {
    let account = store
        .create_account("Usage", &unique_email("usage"))
        .await
        .expect("account");
    let (_, digest, prefix) = generate_api_key();
    let key = store
        .create_key(
            &account.id,
            "k",
            digest,
            &prefix,
            &KeyLimits {
                budget_nano_usd: Some(1_000),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    store
        .credit(&account.id, 10_000, "admin", &new_id("ref"))
        .await
        .expect("credit");
    let t0 = Utc::now() - ChronoDuration::hours(1);
    let records: Vec<_> = (0..5)
        .map(|i| {
            usage(
                &format!("req-{}-{i}", account.id),
                &account.id,
                Some(&key.id),
                200,
                None,
                t0 + ChronoDuration::seconds(i),
            )
        })
        .collect();
    let rules = AlertRules {
        wallet_below_nano_usd: Some(9_500),
        key_budget_percent: Some(80),
    };
    assert_eq!(store.insert_usage(&records[..3], &rules).await.expect("insert"), 3);
    // Replays are skipped: idempotent by request id.
    assert_eq!(store.insert_usage(&records, &rules).await.expect("replay"), 2);
    let w = store.wallet(&account.id).await.expect("wallet");
    assert_eq!((w.credited_nano_usd, w.spent_nano_usd), (10_000, 1_000));
    let k = &store.list_keys(&account.id).await.expect("keys")[0];
    assert_eq!(k.spent_nano_usd, 1_000);

    // One alert per crossing: the wallet went below 9,500 once, the key past 80 % once.
    let alerts = store.due_alerts(10).await.expect("alerts");
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(alerts.iter().any(|a| a.payload.contains("wallet.balance_low")));
    assert!(alerts.iter().any(|a| a.payload.contains("key.budget_share")));
    assert!(
        store.due_alerts(10).await.expect("claimed").is_empty(),
        "claimed alerts are not handed out twice"
    );
    store.alert_failed(alerts[0].id, Duration::ZERO).await.expect("failed");
    let retry = store.due_alerts(10).await.expect("retry");
    assert_eq!((retry.len(), retry[0].attempts), (1, 1));
    for a in alerts {
        store.alert_delivered(a.id).await.expect("delivered");
    }
    store
        .insert_usage(
            &[usage(&new_id("r"), &account.id, Some(&key.id), 100, None, t0)],
            &rules,
        )
        .await
        .expect("more");
    assert!(
        store.due_alerts(10).await.expect("none").is_empty(),
        "no new crossing, no new alert"
    );

    // Paging by time, filters.
    let filter = UsageFilter {
        account_id: account.id.clone(),
        key_id: None,
        from: None,
        to: None,
    };
    let first = store.usage_page(&filter, None, 4).await.expect("page");
    assert_eq!(first.len(), 4);
    let after = first.last().map(|r| (r.created_at, r.request_id.clone()));
    let rest = store.usage_page(&filter, after, 100).await.expect("page 2");
    assert_eq!(rest.len(), 2);
    assert!(first
        .iter()
        .chain(&rest)
        .zip(first.iter().chain(&rest).skip(1))
        .all(|(a, b)| (a.created_at, &a.request_id) < (b.created_at, &b.request_id)));
    assert_eq!(rest[0].cached_tokens, 2);
    let windowed = UsageFilter {
        from: Some(t0 + ChronoDuration::seconds(2)),
        to: Some(t0 + ChronoDuration::seconds(4)),
        ..filter.clone()
    };
    assert_eq!(store.usage_page(&windowed, None, 100).await.expect("window").len(), 2);
    let other_key = UsageFilter {
        key_id: Some("key_other".into()),
        ..filter.clone()
    };
    assert!(store.usage_page(&other_key, None, 100).await.expect("other").is_empty());

    // Retention.
    assert_eq!(
        store.purge_usage(t0 + ChronoDuration::seconds(1)).await.expect("purge"),
        2
    );

    // Erasure: personal data and keys go, billing rows stay without their key.
    store.erase_account(&account.id).await.expect("erase");
    let erased = store.get_account(&account.id).await.expect("account");
    assert_eq!(
        (erased.status, erased.email.as_deref(), erased.name.as_str()),
        (AccountStatus::Erased, None, "")
    );
    assert!(store.list_keys(&account.id).await.expect("keys").is_empty());
    assert_eq!(store.find_key(digest).await.expect("find"), None);
    let kept = store.usage_page(&filter, None, 100).await.expect("kept");
    assert_eq!(kept.len(), 4);
    assert!(kept.iter().all(|r| r.key_id.is_none()));
}
