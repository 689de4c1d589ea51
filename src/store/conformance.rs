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
