//! Versioned migrations, embedded in the binary. Each backend has its own SQL; a migration's
//! version is its file's number. Applied in order at start inside one transaction each; a
//! second start finds them all recorded in `schema_migrations` and does nothing.

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts_keys_wallets",
        sql: include_str!("../../migrations/postgres/0001_accounts_keys_wallets.sql"),
    },
    Migration {
        version: 2,
        name: "usage_leases_alerts",
        sql: include_str!("../../migrations/postgres/0002_usage_leases_alerts.sql"),
    },
    Migration {
        version: 3,
        name: "record_bounds_end_user_unmatched_payments",
        sql: include_str!("../../migrations/postgres/0003_record_bounds_end_user_unmatched_payments.sql"),
    },
];

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts_keys_wallets",
        sql: include_str!("../../migrations/sqlite/0001_accounts_keys_wallets.sql"),
    },
    Migration {
        version: 2,
        name: "usage_leases_alerts",
        sql: include_str!("../../migrations/sqlite/0002_usage_leases_alerts.sql"),
    },
    Migration {
        version: 3,
        name: "record_bounds_end_user_unmatched_payments",
        sql: include_str!("../../migrations/sqlite/0003_record_bounds_end_user_unmatched_payments.sql"),
    },
];
