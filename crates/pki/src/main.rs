//! `bulwark-pki`: create and manage the development certificates of a Bulwark broker.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use bulwark_pki::{format_date, CertRole, DevPki, DEFAULT_SERVER_NAMES};
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

const EXAMPLES: &str = "\
Examples:
  # First time: create the CA, the broker certificate and the CRL in certs/dev
  bulwark-pki init

  # Broker reachable as plc-gw.plant.local and 10.0.4.20, with two device certificates
  bulwark-pki init --server-name plc-gw.plant.local --server-name 10.0.4.20 \\
      --client press-7 --client scada-hmi

  # Add a certificate for a new device later
  bulwark-pki issue-client press-8

  # A device was lost or stolen: block it (the broker reads crl.pem)
  bulwark-pki revoke press-8

  # What is there, when does it expire, what is revoked?
  bulwark-pki show

Files (in --dir, default certs/dev):
  ca.pem                 CA certificate: install on every client and on the broker
  ca.key                 CA private key: keep it private, never copy it to devices
  server.pem/.key        broker certificate and key
  clients/NAME.pem/.key  client certificate and key: copy both to the device
  crl.pem                revocation list the broker checks
  revoked.txt            serial numbers of revoked certificates

This is a development/lab PKI. Use your plant's PKI in production.";

/// Create and manage the development certificates (TLS) for a Bulwark broker and its clients.
///
/// Every client (device, HMI, operator tool) gets its own certificate, signed by a
/// private development CA. The broker trusts that CA and refuses revoked certificates.
#[derive(Debug, Parser)]
#[command(name = "bulwark-pki", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct DirArg {
    /// Directory holding the certificates and keys.
    #[arg(long, value_name = "DIR", default_value = "certs/dev")]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the broker certificate, client certificates and the CRL, as far as
    /// they are missing. Existing files are never overwritten; safe to run again.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Host name or IP address clients use to reach the broker (repeat for several).
        /// Only used when server.pem is created.
        #[arg(
            long = "server-name",
            value_name = "NAME",
            default_values_t = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string())
        )]
        server_names: Vec<String>,
        /// Also create a client certificate with this name (repeat for several).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
    },
    /// Create a certificate and key for a new client: clients/NAME.pem and clients/NAME.key.
    IssueClient {
        /// Client name, e.g. press-7 (letters, digits, '-', '_', '.'). Becomes the
        /// certificate's common name.
        name: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Revoke a client certificate: the broker refuses it once it reloads crl.pem.
    Revoke {
        /// Client name, as in clients/NAME.pem.
        name: String,
        #[command(flatten)]
        dir: DirArg,
    },
    /// List the certificates with common name, serial number, expiry and revocation status.
    Show {
        #[command(flatten)]
        dir: DirArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Init {
            dir,
            server_names,
            clients,
        } => init(&dir.dir, &server_names, &clients),
        Command::IssueClient { name, dir } => {
            let pki = DevPki::open(&dir.dir)?;
            pki.issue_client(&name)?;
            println!("created {}", pki.client_cert_path(&name).display());
            println!("created {}", pki.client_key_path(&name).display());
            println!(
                "Copy both files and {} to the client.",
                pki.ca_path().display()
            );
            Ok(())
        }
        Command::Revoke { name, dir } => {
            let pki = DevPki::open(&dir.dir)?;
            // Fails with a helpful message if the client does not exist.
            let before = pki.client_info(&name)?;
            pki.revoke(&name)?;
            let crl = pki.crl_info()?;
            if before.revoked {
                println!(
                    "{name} (serial {}) was already revoked; {} re-signed (CRL number {})",
                    before.serial,
                    pki.crl_path().display(),
                    crl.crl_number
                );
            } else {
                println!(
                    "revoked {name} (serial {}); {} updated (CRL number {}, {} revoked)",
                    before.serial,
                    pki.crl_path().display(),
                    crl.crl_number,
                    crl.revoked.len()
                );
            }
            println!("The broker refuses the certificate once it has loaded the new CRL.");
            Ok(())
        }
        Command::Show { dir } => show(&dir.dir),
    }
}

fn init(dir: &Path, server_names: &[String], clients: &[String]) -> Result<()> {
    let server_names: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let (pki, report) = DevPki::ensure_with_report(dir, &server_names, &clients)?;
    println!("Development PKI in {}", pki.dir.display());
    for path in &report.created {
        println!("  created  {}", path.display());
    }
    for path in &report.found {
        println!("  found    {}", path.display());
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    if report.created.is_empty() {
        println!("Nothing to do: everything was already there.");
    }
    Ok(())
}

fn show(dir: &Path) -> Result<()> {
    let pki = DevPki::open(dir)?;
    let certs = pki.list()?;
    let now = OffsetDateTime::now_utc();

    let rows: Vec<[String; 5]> = certs
        .iter()
        .map(|c| {
            let status = if c.revoked {
                "REVOKED"
            } else if c.is_expired_at(now) {
                "EXPIRED"
            } else if now < c.not_before {
                "not yet valid"
            } else {
                "valid"
            };
            let role = match &c.role {
                CertRole::Client(_) => "client".to_owned(),
                other => other.to_string(),
            };
            [
                role,
                c.common_name.clone(),
                c.serial.to_string(),
                format_date(c.not_after),
                status.to_owned(),
            ]
        })
        .collect();
    let header = ["ROLE", "COMMON NAME", "SERIAL", "EXPIRES", "STATUS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }

    println!();
    if pki.crl_path().exists() {
        let crl = pki.crl_info()?;
        let next = crl
            .next_update
            .map(format_date)
            .unwrap_or_else(|| "-".into());
        println!(
            "CRL {}: number {}, {} revoked, next update {}",
            pki.crl_path().display(),
            crl.crl_number,
            crl.revoked.len(),
            next
        );
        if crl.next_update.is_some_and(|t| t < now) {
            eprintln!("warning: the CRL has expired; `bulwark-pki revoke NAME` re-signs it");
        }
        let listed = pki.revoked_serials()?;
        let in_crl: Vec<u64> = crl.revoked.iter().map(|(s, _)| *s).collect();
        if listed.iter().any(|s| !in_crl.contains(s)) || in_crl.iter().any(|s| !listed.contains(s))
        {
            eprintln!(
                "warning: {} and {} disagree; the broker only uses the CRL",
                pki.revoked_list_path().display(),
                pki.crl_path().display()
            );
        }
    } else {
        println!(
            "CRL {}: missing; run `bulwark-pki init --dir {}` to create it",
            pki.crl_path().display(),
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_defaults() {
        let cli = Cli::try_parse_from(["bulwark-pki", "init"]).unwrap();
        match cli.command {
            Command::Init {
                dir,
                server_names,
                clients,
            } => {
                assert_eq!(dir.dir, Path::new("certs/dev"));
                assert_eq!(server_names, DEFAULT_SERVER_NAMES);
                assert!(clients.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn repeated_options() {
        let cli = Cli::try_parse_from([
            "bulwark-pki",
            "init",
            "--dir",
            "x",
            "--server-name",
            "::1",
            "--server-name",
            "gw",
            "--client",
            "a",
            "--client",
            "b",
        ])
        .unwrap();
        match cli.command {
            Command::Init {
                dir,
                server_names,
                clients,
            } => {
                assert_eq!(dir.dir, Path::new("x"));
                assert_eq!(server_names, ["::1", "gw"]);
                assert_eq!(clients, ["a", "b"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
