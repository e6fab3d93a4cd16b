//! What the reconcilers read and write, on both backends: leader leases
//! (including races between controllers), restart policies and automatic
//! restarts with their crash-loop limit, and orphan VMs reported by hosts.

use stratus_common::time::now_micros;
use stratus_datastore::*;

async fn sqlite() -> (Datastore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::sqlite_url(dir.path()))
        .await
        .expect("open sqlite");
    (ds, dir)
}

async fn postgres() -> (Datastore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ds = Datastore::open(&stratus_test_utils::postgres_url().await)
        .await
        .expect("open postgres");
    (ds, dir)
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { super::$name(&super::sqlite().await.0).await; })*
        }
        mod on_postgres {
            $(#[tokio::test] async fn $name() { super::$name(&super::postgres().await.0).await; })*
        }
    };
}

both_backends!(
    leases_are_held_by_one_holder_at_a_time,
    concurrent_acquirers_of_a_lease_have_one_winner,
);

const SEC: i64 = 1_000_000;

async fn leases_are_held_by_one_holder_at_a_time(ds: &Datastore) {
    let now = now_micros();
    assert_eq!(ds.lease_holder("r").await.expect("holder"), None);
    assert!(ds
        .lease_acquire("r", "a", now, now + 10 * SEC)
        .await
        .expect("a takes"));
    let held = ds.lease_holder("r").await.expect("holder").expect("held");
    assert_eq!(
        held,
        LeaseRecord {
            name: "r".into(),
            holder: "a".into(),
            expires_at: now + 10 * SEC
        }
    );
    // Another holder is refused while it lasts, and changes nothing.
    assert!(!ds
        .lease_acquire("r", "b", now + SEC, now + 11 * SEC)
        .await
        .expect("b tries"));
    assert_eq!(ds.lease_holder("r").await.expect("h").expect("held"), held);
    // The holder renews.
    assert!(ds
        .lease_acquire("r", "a", now + 2 * SEC, now + 12 * SEC)
        .await
        .expect("a renews"));
    assert_eq!(
        ds.lease_holder("r")
            .await
            .expect("h")
            .expect("held")
            .expires_at,
        now + 12 * SEC
    );
    // Other names are other leases.
    assert!(ds
        .lease_acquire("other", "b", now, now + SEC)
        .await
        .expect("b takes another"));
    // Expired: anyone may take it.
    assert!(!ds
        .lease_acquire("r", "b", now + 12 * SEC - 1, now + 20 * SEC)
        .await
        .expect("not yet"));
    assert!(ds
        .lease_acquire("r", "b", now + 12 * SEC, now + 22 * SEC)
        .await
        .expect("b takes the expired lease"));
    assert_eq!(
        ds.lease_holder("r").await.expect("h").expect("held").holder,
        "b"
    );
    // Only the holder releases; then it is free at once.
    assert!(!ds
        .lease_release("r", "a")
        .await
        .expect("a is not the holder"));
    assert!(ds.lease_release("r", "b").await.expect("b releases"));
    assert!(!ds.lease_release("r", "b").await.expect("twice"));
    assert_eq!(ds.lease_holder("r").await.expect("holder"), None);
    assert!(ds
        .lease_acquire("r", "a", now + 13 * SEC, now + 23 * SEC)
        .await
        .expect("a takes the released lease"));
}

/// Many acquirers at once, for a free lease and then for an expired one:
/// exactly one wins each time.
async fn concurrent_acquirers_of_a_lease_have_one_winner(ds: &Datastore) {
    race(&vec![ds.clone(); 24], "free").await;
    let now = now_micros();
    assert!(ds
        .lease_acquire("expired", "old", now - 2 * SEC, now - SEC)
        .await
        .expect("old lease"));
    race(&vec![ds.clone(); 24], "expired").await;
}

/// Every store in `stores` (several controllers, or several tasks of one)
/// asks for `name` at once as a holder of its own; asserts one winner.
async fn race(stores: &[Datastore], name: &str) {
    let now = now_micros();
    let mut set = tokio::task::JoinSet::new();
    for (i, ds) in stores.iter().enumerate() {
        let ds = ds.clone();
        let name = name.to_string();
        set.spawn(async move {
            let holder = format!("c{i}");
            let won = ds
                .lease_acquire(&name, &holder, now, now + 10 * SEC)
                .await
                .expect("acquire");
            (holder, won)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        let (holder, won) = r.expect("task");
        if won {
            winners.push(holder);
        }
    }
    assert_eq!(winners.len(), 1, "winners for {name}: {winners:?}");
    let held = stores[0]
        .lease_holder(name)
        .await
        .expect("holder")
        .expect("held");
    assert_eq!(held.holder, winners[0]);
}

/// Three controllers (three pools) on one PostgreSQL race for one lease.
#[tokio::test]
async fn controllers_on_postgres_race_for_a_lease_and_one_wins() {
    let url = stratus_test_utils::postgres_url().await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Datastore::open(&url).await.expect("open"));
    }
    for round in 0..5 {
        let many: Vec<Datastore> = stores.iter().cycle().take(30).cloned().collect();
        race(&many, &format!("round-{round}")).await;
    }
}
