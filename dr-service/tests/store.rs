//! The store contract, on both backends: SQLite in a temp dir and a real PostgreSQL (a
//! throwaway cluster of Debian's postgresql, see `failback_tests::pg`). Each test runs once
//! per backend.

use std::sync::Arc;

use failback_api::*;
use failback_server::store::{
    self, migrations, AgentRecord, Batch, ClientRecord, CredentialRecord, Store, TokenRecord,
};
use failback_tests::pg::PgCluster;

/// A fresh store of each backend (the temp dir lives as long as the store is used).
fn backends(test: &str) -> Vec<(&'static str, Arc<dyn Store>, tempfile::TempDir)> {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let url = PgCluster::fresh_database(test);
    vec![
        ("sqlite", store::open(None, d1.path()).unwrap(), d1),
        ("postgres", store::open(Some(&url), d2.path()).unwrap(), d2),
    ]
}

fn instance(id: &str, seen: u64) -> RecoveryInstance {
    let mut i = RecoveryInstance {
        recovery_instance_id: id.into(),
        hostname: None,
        source_hints: IdentificationHints::default(),
        agent: AgentStatus::default(),
        failback: FailbackStatus::default(),
        config: ReplicationConfig::default(),
        created_at: 1,
    };
    i.agent.last_seen_at = Some(seen);
    i.failback.client_last_seen_at = Some(seen);
    i
}

const A: &str = "i-00000000000000aa";
const B: &str = "i-00000000000000bb";

#[test]
fn records_round_trip_and_queries_filter() {
    for (name, s, _d) in backends("round_trip") {
        assert_eq!(s.schema_version().unwrap(), migrations::latest(), "{name}");
        let mut b = Batch::by("bootstrap-admin");
        let mut a = instance(A, 10);
        a.failback.state = FailbackState::FailbackInProgress;
        b.put(None, a.clone());
        b.put(None, instance(B, 10));
        b.tokens.push(TokenRecord {
            hash: "t1".into(),
            kind: TokenKind::Agent,
            instance_id: None,
            created_at: 1,
            expires_at: 99,
            used_at: None,
        });
        b.clients.push(ClientRecord {
            client_id: "fc-1".into(),
            secret_hash: "cs".into(),
            instance_id: A.into(),
            created_at: 2,
            stopped: false,
        });
        b.agents.push(AgentRecord {
            secret_hash: "as".into(),
            instance_id: A.into(),
            created_at: 2,
        });
        b.credentials.push(CredentialRecord {
            id: "cred-0123456789abcdef".into(),
            name: "ci-bot".into(),
            role: Role::Viewer,
            secret_hash: "crs".into(),
            created_at: 3,
            created_by: "bootstrap-admin".into(),
            revoked_at: None,
            revoked_by: None,
        });
        b.event(5, Some(A), "E1", "one".into());
        b.event(6, None, "E2", "two".into());
        s.apply(b).unwrap();

        assert_eq!(s.instance(A).unwrap().unwrap(), a, "{name}");
        assert_eq!(s.instances().unwrap().len(), 2, "{name}");
        // Only the running failback (A) is stale; B is not running.
        let stale = s.stale_instances(11, 0).unwrap();
        assert_eq!(stale.len(), 1, "{name}");
        assert_eq!(stale[0].recovery_instance_id, A);
        assert!(s.stale_instances(10, 10).unwrap().is_empty(), "{name}");
        assert_eq!(s.token("t1").unwrap().unwrap().kind, TokenKind::Agent);
        assert_eq!(s.client_by_secret("cs").unwrap().unwrap().client_id, "fc-1");
        assert_eq!(s.clients_of(A).unwrap().len(), 1);
        assert_eq!(s.agent_by_secret("as").unwrap().unwrap().instance_id, A);
        let c = s.credential_by_secret("crs").unwrap().unwrap();
        assert_eq!(
            (c.name.as_str(), c.role),
            ("ci-bot", Role::Viewer),
            "{name}"
        );
        assert_eq!(s.credentials().unwrap().len(), 1);
        let all = s.events(None, 0, 10).unwrap();
        assert_eq!(all.len(), 2, "{name}");
        assert_eq!(all[0].actor.as_deref(), Some("bootstrap-admin"));
        let only_a = s.events(Some(A), 0, 10).unwrap();
        assert_eq!(only_a.len(), 1, "{name}");
        assert_eq!(s.events(None, all[0].seq, 10).unwrap().len(), 1, "{name}");
    }
}

#[test]
fn stale_writes_and_reused_tokens_conflict_and_store_nothing() {
    for (name, s, _d) in backends("conflicts") {
        let mut b = Batch::default();
        b.put(None, instance(A, 1));
        b.tokens.push(TokenRecord {
            hash: "t1".into(),
            kind: TokenKind::Pairing,
            instance_id: Some(A.into()),
            created_at: 1,
            expires_at: 99,
            used_at: None,
        });
        s.apply(b).unwrap();
        let read = s.instance(A).unwrap().unwrap();
        // Someone else writes first.
        let mut b = Batch::default();
        b.put(Some(&read), instance(A, 2));
        s.apply(b).unwrap();
        // Our write, based on the old read, is refused whole (the event is not stored).
        let mut b = Batch::default();
        b.put(Some(&read), instance(A, 3));
        b.event(1, Some(A), "LOST", "must not be stored".into());
        assert!(s.apply(b).unwrap_err().is_conflict(), "{name}");
        assert_eq!(s.instance(A).unwrap().unwrap().agent.last_seen_at, Some(2));
        assert!(s.events(None, 0, 10).unwrap().is_empty(), "{name}");
        // Creating an instance that exists meanwhile conflicts.
        let mut b = Batch::default();
        b.put(None, instance(A, 4));
        assert!(s.apply(b).unwrap_err().is_conflict(), "{name}");
        // A one-time token is marked used once.
        let used = TokenRecord {
            used_at: Some(7),
            ..s.token("t1").unwrap().unwrap()
        };
        let mut b = Batch::default();
        b.tokens.push(used.clone());
        s.apply(b).unwrap();
        let mut b = Batch::default();
        b.tokens.push(used);
        assert!(s.apply(b).unwrap_err().is_conflict(), "{name}");
    }
}

/// Eight threads each add 1 twenty times to one instance with read-modify-write retried on
/// conflict: no update is lost (160 in the end) on either backend.
#[test]
fn concurrent_read_modify_write_loses_nothing() {
    for (name, s, _d) in backends("concurrent") {
        let mut b = Batch::default();
        b.put(None, instance(A, 0));
        s.apply(b).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut conflicts = 0u32;
                    for _ in 0..20 {
                        loop {
                            let old = s.instance(A).unwrap().unwrap();
                            let mut new = old.clone();
                            new.agent.last_seen_at = Some(old.agent.last_seen_at.unwrap() + 1);
                            let mut b = Batch::default();
                            b.put(Some(&old), new);
                            match s.apply(b) {
                                Ok(()) => break,
                                Err(e) if e.is_conflict() => conflicts += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        let conflicts: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let got = s.instance(A).unwrap().unwrap().agent.last_seen_at;
        assert_eq!(got, Some(160), "{name} ({conflicts} conflicts retried)");
    }
}

/// Opening an already migrated PostgreSQL database again (another replica starting) applies
/// nothing twice.
#[test]
fn postgres_migrations_apply_once() {
    let url = PgCluster::fresh_database("migrate_once");
    let d = tempfile::tempdir().unwrap();
    let s1 = store::open(Some(&url), d.path()).unwrap();
    let s2 = store::open(Some(&url), d.path()).unwrap();
    assert_eq!(s1.schema_version().unwrap(), migrations::latest());
    assert_eq!(s2.schema_version().unwrap(), migrations::latest());
    let err = store::open(Some("postgres://failback:pw@127.0.0.1:1/none"), d.path())
        .err()
        .expect("no server on port 1")
        .to_string();
    assert!(err.contains("127.0.0.1:1") && !err.contains("pw"), "{err}");
}
