//! `stratus pool …`: shared storage pools (directories several hosts
//! mount), with the hosts that see each.

use clap::Subcommand;
use stratus_client::types;
use stratus_client::Client;

use crate::commands::{name, print_list, ts};
use crate::output::{self, bytes, fields, Format, Table};
use crate::CliError;

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Add a shared pool: a directory mounted at the same path on every host
    /// that should see it (hosts report whether they do within seconds)
    Create {
        name: String,
        #[arg(long)]
        path: String,
    },
    /// List shared pools: capacity, allocation, hosts that see each
    List,
    /// One pool, with every host's view of it
    Show { pool: String },
    /// Remove a pool no VM uses (the files in its directory stay)
    Delete { pool: String },
}

fn seeing(p: &types::StoragePool) -> usize {
    p.hosts.iter().filter(|h| h.error.is_none()).count()
}

fn pool_fields(p: &types::StoragePool) -> output::Table {
    let rows = vec![
        ("name", p.name.clone()),
        ("id", p.id.to_string()),
        ("path", p.path.clone()),
        ("capacity", bytes(p.capacity_bytes)),
        ("available", bytes(p.available_bytes)),
        ("allocated", bytes(p.allocated_bytes)),
        (
            "hosts",
            format!("{} of {} see it", seeing(p), p.hosts.len()),
        ),
        ("created", ts(&p.created_at)),
    ];
    let views: Vec<(String, String)> = p
        .hosts
        .iter()
        .map(|h| {
            (
                format!("host {}", h.host),
                h.error.clone().unwrap_or_else(|| "ok".into()),
            )
        })
        .collect();
    let mut t = fields(rows);
    for (k, v) in views {
        t.row(vec![k, v]);
    }
    t
}

pub async fn pool(c: &Client, f: Format, cmd: PoolCmd) -> Result<(), CliError> {
    match cmd {
        PoolCmd::Create { name: n, path } => {
            let p = c
                .pool_create()
                .body(types::StoragePoolCreate {
                    name: name(&n)?,
                    path,
                })
                .send()
                .await?
                .into_inner();
            output::print(f, &p, pool_fields);
        }
        PoolCmd::List => {
            let items = c.pool_list().send().await?.into_inner();
            print_list(f, items, None, |items| {
                let mut t = Table::new(&["NAME", "PATH", "CAPACITY", "ALLOCATED", "HOSTS", "ID"]);
                for x in items {
                    t.row(vec![
                        x.name.clone(),
                        x.path.clone(),
                        bytes(x.capacity_bytes),
                        bytes(x.allocated_bytes),
                        seeing(x).to_string(),
                        x.id.to_string(),
                    ]);
                }
                t
            });
        }
        PoolCmd::Show { pool } => {
            let p = c.pool_view().pool(&pool).send().await?.into_inner();
            output::print(f, &p, pool_fields);
        }
        PoolCmd::Delete { pool } => {
            c.pool_delete().pool(&pool).send().await?;
            output::print_deleted(f, &pool);
        }
    }
    Ok(())
}
