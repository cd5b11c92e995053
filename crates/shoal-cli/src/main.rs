//! `shoal`: run a node (`shoal serve`) or talk to one (every other command).

mod bench;
mod client;
mod project;
mod serve;
mod units;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::client::{Client, ClientArgs};

/// Shoal: a serverless platform running WebAssembly functions.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the embedded single-node default, with the example
    /// functions deployed under tenant `demo`.
    Serve(Box<serve::ServeArgs>),
    /// Deploy a function as TENANT/NAME: a wasm component, a WASI command
    /// module, a Python or JavaScript file, or a folder with an `app.py` or
    /// `app.js`.
    Deploy {
        function: String,
        file: PathBuf,
        /// Linear memory limit, e.g. 64MiB.
        #[arg(long)]
        memory: Option<String>,
        /// Time limit per call, e.g. 5s or 250ms.
        #[arg(long)]
        timeout: Option<String>,
        /// An env var the function sees, NAME=VALUE; repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Run the component's `init` once, now, and start every call
        /// from the state it leaves.
        #[arg(long)]
        snapshot: bool,
        /// It must be an HTTP function (a wasi:http component, or Python
        /// or JavaScript that answers requests); refused otherwise.
        #[arg(long)]
        http: bool,
        /// An HTTP function anyone may call (default: only with the
        /// tenant's token).
        #[arg(long)]
        public: bool,
        /// Where the function's outbound HTTP requests may go,
        /// scheme://host[:port] (e.g. https://api.example.com,
        /// https://*.example.com, http://127.0.0.1:8080); repeatable.
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
        /// A secret of the tenant the function gets (as an env var and
        /// through wasi:config/store), by name; repeatable.
        #[arg(long = "secret")]
        secret: Vec<String>,
    },
    /// Create a function project NAME (in the current directory) from a
    /// template, with a README saying how to build, deploy and invoke it.
    New {
        #[arg(value_enum)]
        language: project::Template,
        name: String,
    },
    /// Call TENANT/NAME and print its output.
    Invoke {
        function: String,
        /// Input given inline.
        #[arg(short = 'd', long = "data", conflicts_with = "data_file")]
        data: Option<String>,
        /// Input read from a file (`-` for stdin).
        #[arg(long = "data-file")]
        data_file: Option<PathBuf>,
        /// Submit the call and print its id at once; `shoal call get ID`
        /// reads its status and output later.
        #[arg(long = "async")]
        is_async: bool,
    },
    /// Asynchronous calls.
    Call {
        #[command(subcommand)]
        command: CallCommand,
    },
    /// List a tenant's functions.
    Ls {
        #[arg(default_value = "demo")]
        tenant: String,
    },
    /// Remove TENANT/NAME.
    Rm { function: String },
    /// Recent stdout/stderr lines of TENANT/NAME, with call ids (and the
    /// trace id of a sampled call).
    Logs {
        function: String,
        /// Keep following: print new lines as calls end, until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// What TENANT's calls used: calls by outcome, CPU, wall and queue
    /// time, memory-time, outbound HTTP, spawns.
    Usage {
        tenant: String,
        /// A row per function (default: the tenant's total).
        #[arg(long, value_parser = ["function", "tenant"], default_value = "tenant")]
        by: String,
        /// How far back, e.g. 1h, 30m, 7d (default 1h).
        #[arg(long, default_value = "1h")]
        since: String,
    },
    /// Read and write the global state tier.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Load-test a node of its own: an open-loop sweep of offered rates
    /// over 1, 10, 100, 1000 functions, written as CSV and SVG charts.
    Bench(bench::BenchArgs),
    /// Manage tenants (admin).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// The versions of TENANT/NAME kept (every deploy is one), newest
    /// first, with the aliases routing calls to each.
    Versions { function: String },
    /// A function's aliases: names (prod, canary, …) that route its calls
    /// to one version, or split them between two by weight. Call one as
    /// TENANT/NAME@ALIAS (a version as TENANT/NAME@N).
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Queues: messages a consumer function of the tenant takes in
    /// batches, at least once, with retries and dead letters.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Cron triggers: run a function of the tenant, with a fixed input,
    /// as an asynchronous call at each tick of a schedule.
    Trigger {
        #[command(subcommand)]
        command: TriggerCommand,
    },
    /// A tenant's secrets: write-only values its functions get when their
    /// deploy names them (`shoal deploy --secret NAME`), as env vars and
    /// through wasi:config/store.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AliasCommand {
    /// Point ALIAS of TENANT/NAME at a version (`3`), or split its calls
    /// between two by weight (`3=90 4=10`); atomic, so `set prod 3` is a
    /// rollback. `latest` is what the unversioned name runs (the next
    /// deploy moves it back to the newest version).
    Set {
        function: String,
        alias: String,
        /// VERSION, or VERSION=WEIGHT twice.
        #[arg(required = true, num_args = 1..=2)]
        versions: Vec<String>,
    },
    /// List the aliases of TENANT/NAME.
    Ls { function: String },
    /// Remove ALIAS of TENANT/NAME.
    Rm { function: String, alias: String },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Create (or change) the queue TENANT/QUEUE, consumed by FUNCTION (of
    /// the same tenant; `name`, `name@N` or `name@alias`).
    Add {
        queue: String,
        #[arg(long)]
        consumer: String,
        /// Messages per batch, at most (default 10).
        #[arg(long)]
        batch_size: Option<u32>,
        /// How long a partial batch waits for more, e.g. 1s (default).
        #[arg(long, value_parser = units::parse_duration)]
        batch_wait: Option<std::time::Duration>,
        /// How long a batch's messages stay taken before they are offered
        /// again (default the consumer's timeout + 5 s, at least 30 s).
        #[arg(long, value_parser = units::parse_duration)]
        visibility_timeout: Option<std::time::Duration>,
        /// Attempts before a message moves to the dead letters (default 5).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// The first retry's delay, doubled at each attempt (default 1s).
        #[arg(long, value_parser = units::parse_duration)]
        retry_delay: Option<std::time::Duration>,
        /// Batches running at once (default 2).
        #[arg(long)]
        concurrency: Option<u32>,
    },
    /// List TENANT's queues: what each holds and has done.
    Ls { tenant: String },
    /// Send a message (or, with --lines, one per line of the input).
    Send {
        queue: String,
        #[arg(short = 'd', long = "data", conflicts_with = "data_file")]
        data: Option<String>,
        /// The message read from a file (`-` for stdin).
        #[arg(long = "data-file")]
        data_file: Option<PathBuf>,
        /// Each line of the input is a message (sent 1,000 at a time).
        #[arg(long)]
        lines: bool,
    },
    /// Print the queue's dead letters as JSON.
    Dead {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send the dead letters back to the queue (attempts from 0).
    Redrive { queue: String },
    /// Remove the dead letters.
    Purge { queue: String },
    /// Remove the queue and every message it holds.
    Rm { queue: String },
}

#[derive(Debug, Subcommand)]
enum TriggerCommand {
    /// Create (or replace) the trigger TENANT/NAME: run FUNCTION (of the
    /// same tenant) at each tick of SCHEDULE, a cron expression of five
    /// fields (minute hour day-of-month month day-of-week) or six (seconds
    /// first), e.g. "*/5 * * * *" or "0 30 9 * * MON-FRI".
    Add {
        trigger: String,
        schedule: String,
        #[arg(long)]
        function: String,
        /// The IANA time zone the schedule is read in (default UTC),
        /// e.g. Europe/Berlin.
        #[arg(long)]
        zone: Option<String>,
        /// The input each call gets, inline.
        #[arg(short = 'd', long = "data", conflicts_with = "data_file")]
        data: Option<String>,
        /// The input read from a file (`-` for stdin); at most 64 KiB.
        #[arg(long = "data-file")]
        data_file: Option<PathBuf>,
        /// Create it paused (no tick runs until it is set again without).
        #[arg(long)]
        disabled: bool,
    },
    /// List TENANT's triggers: schedule, function, last and next run.
    Ls { tenant: String },
    /// Remove the trigger TENANT/NAME.
    Rm { trigger: String },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Set TENANT's secret NAME to the value read from standard input (so
    /// it stays out of the shell's history), or from --value-file.
    Set {
        tenant: String,
        name: String,
        #[arg(long = "value-file")]
        value_file: Option<PathBuf>,
    },
    /// Remove TENANT's secret NAME.
    Rm { tenant: String, name: String },
    /// List TENANT's secrets: names, when each was set, the functions
    /// naming each (never a value).
    Ls { tenant: String },
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Print the value of TENANT/KEY.
    Get { key: String },
    /// Set TENANT/KEY to a value given inline or read from a file.
    Set {
        key: String,
        value: Option<String>,
        #[arg(long = "data-file", conflicts_with = "value")]
        data_file: Option<PathBuf>,
    },
    /// Delete TENANT/KEY.
    Del { key: String },
    /// List a tenant's keys with their sizes.
    Ls {
        #[arg(default_value = "demo")]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
enum CallCommand {
    /// Print the record of an asynchronous call as JSON: status (queued,
    /// running, succeeded, failed), timings, error and output.
    Get {
        id: String,
        /// Wait until the call has finished.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant and print its token (shown once).
    Create { name: String },
    /// Delete a tenant and everything it has: functions, state, call
    /// records, tokens. Runs in the background on the node; --wait waits
    /// until it is gone.
    Rm {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Give a tenant a new token (printed, shown once); the old one stays
    /// valid for --grace (0s: refused at once).
    Rotate {
        name: String,
        #[arg(long, default_value = "1h", value_parser = units::parse_duration)]
        grace: std::time::Duration,
    },
    /// Refuse every token of a tenant from now on (rotate to give it a new one).
    Revoke { name: String },
    /// Show a tenant's weight and limits (set, and in force); with any of
    /// the options, set them first (the others keep what was set; --reset
    /// starts from the node's defaults).
    Limits {
        name: String,
        /// Its share of the CPU and running places when tenants compete.
        #[arg(long)]
        weight: Option<u32>,
        /// Root calls running at once while no other tenant waits.
        #[arg(long)]
        running: Option<u32>,
        /// Sandboxes its calls hold at once.
        #[arg(long)]
        sandboxes: Option<u32>,
        /// Sum of the memory limits of its running calls, e.g. 2GiB.
        #[arg(long, value_parser = units::parse_size)]
        memory: Option<u64>,
        /// Bytes of its values in the local state tier, e.g. 256MiB.
        #[arg(long, value_parser = units::parse_size)]
        local_memory: Option<u64>,
        /// Bytes of its values in the global (durable) state tier, e.g. 4GiB.
        #[arg(long, value_parser = units::parse_size)]
        state_quota: Option<u64>,
        /// Forget what was set before applying the options.
        #[arg(long)]
        reset: bool,
    },
}

fn read_input(data: Option<String>, data_file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    match (data, data_file) {
        (Some(data), _) => Ok(data.into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
            Ok(buf)
        }
        (None, Some(path)) => std::fs::read(&path).with_context(|| format!("reading {}", path.display())),
        (None, None) => Ok(Vec::new()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Serve(args) => return serve::run(*args).await,
        Command::Bench(args) => return bench::run(args).await,
        command => command,
    };
    let client = Client::new(&cli.client)?;
    match command {
        Command::Serve(_) | Command::Bench(_) => unreachable!("handled above"),
        Command::Deploy { function, file, memory, timeout, env, snapshot, http, public, allow_host, secret } => {
            let options =
                client::DeployOptions { memory, timeout, env, snapshot, http, public, allow_host, secrets: secret };
            client.deploy(&function, &file, &options).await
        }
        Command::New { language, name } => {
            let root = project::new_project(language, &name, std::path::Path::new("."))?;
            println!("created {} (see its README.md)", root.display());
            Ok(())
        }
        Command::Invoke { function, data, data_file, is_async: true } => {
            println!("{}", client.invoke_async(&function, read_input(data, data_file)?).await?);
            Ok(())
        }
        Command::Call { command: CallCommand::Get { id, wait } } => {
            println!("{}", serde_json::to_string_pretty(&client.call_get(&id, wait).await?)?);
            Ok(())
        }
        Command::Invoke { function, data, data_file, is_async: false } => {
            let output = client.invoke(&function, read_input(data, data_file)?).await?;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&output)?;
            if stdout.is_terminal() && !output.ends_with(b"\n") {
                stdout.write_all(b"\n")?;
            }
            Ok(())
        }
        Command::Ls { tenant } => client.list(&tenant).await,
        Command::Rm { function } => client.remove(&function).await,
        Command::Logs { function, follow } => client.logs(&function, follow).await,
        Command::Usage { tenant, by, since } => client.usage(&tenant, by == "function", &since).await,
        Command::Tenant { command: TenantCommand::Create { name } } => client.create_tenant(&name).await,
        Command::Tenant { command: TenantCommand::Rm { name, wait } } => client.delete_tenant(&name, wait).await,
        Command::Tenant { command: TenantCommand::Rotate { name, grace } } => client.rotate_token(&name, grace).await,
        Command::Tenant { command: TenantCommand::Revoke { name } } => client.revoke_tokens(&name).await,
        Command::Tenant {
            command:
                TenantCommand::Limits { name, weight, running, sandboxes, memory, local_memory, state_quota, reset },
        } => {
            let changes = [
                ("weight", weight.map(u64::from)),
                ("running", running.map(u64::from)),
                ("sandboxes", sandboxes.map(u64::from)),
                ("memory_bytes", memory),
                ("local_bytes", local_memory),
                ("state_quota_bytes", state_quota),
            ];
            client.tenant_limits(&name, &changes, reset).await
        }
        Command::State { command } => match command {
            StateCommand::Get { key } => {
                let value = client.state_get(&key).await?;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&value)?;
                if stdout.is_terminal() && !value.ends_with(b"\n") {
                    stdout.write_all(b"\n")?;
                }
                Ok(())
            }
            StateCommand::Set { key, value, data_file } => client.state_set(&key, read_input(value, data_file)?).await,
            StateCommand::Del { key } => client.state_delete(&key).await,
            StateCommand::Ls { tenant } => client.state_list(&tenant).await,
        },
        Command::Versions { function } => client.versions(&function).await,
        Command::Alias { command } => match command {
            AliasCommand::Set { function, alias, versions } => {
                let mut routes = Vec::new();
                for text in &versions {
                    let (version, weight) = match text.split_once('=') {
                        Some((v, w)) => (v, w.parse::<u32>().with_context(|| format!("weight in {text:?}"))?),
                        None => (text.as_str(), 1),
                    };
                    let version: u32 = version.parse().with_context(|| format!("version in {text:?}"))?;
                    routes.push(serde_json::json!({ "version": version, "weight": weight }));
                }
                client.alias_set(&function, &alias, &serde_json::json!({ "versions": routes })).await
            }
            AliasCommand::Ls { function } => client.alias_list(&function).await,
            AliasCommand::Rm { function, alias } => client.alias_remove(&function, &alias).await,
        },
        Command::Queue { command } => match command {
            QueueCommand::Add {
                queue,
                consumer,
                batch_size,
                batch_wait,
                visibility_timeout,
                max_attempts,
                retry_delay,
                concurrency,
            } => {
                let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
                let spec = serde_json::json!({
                    "consumer": consumer,
                    "batch_size": batch_size,
                    "batch_wait_ms": ms(batch_wait),
                    "visibility_timeout_ms": ms(visibility_timeout),
                    "max_attempts": max_attempts,
                    "retry_delay_ms": ms(retry_delay),
                    "concurrency": concurrency,
                });
                client.queue_put(&queue, &spec).await
            }
            QueueCommand::Ls { tenant } => client.queue_list(&tenant).await,
            QueueCommand::Send { queue, data, data_file, lines } => {
                let input = read_input(data, data_file)?;
                let messages: Vec<Vec<u8>> = if lines {
                    input.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
                } else {
                    vec![input]
                };
                client.queue_send(&queue, messages).await
            }
            QueueCommand::Dead { queue, limit } => client.queue_dead(&queue, limit).await,
            QueueCommand::Redrive { queue } => client.queue_dead_settle(&queue, false).await,
            QueueCommand::Purge { queue } => client.queue_dead_settle(&queue, true).await,
            QueueCommand::Rm { queue } => client.queue_remove(&queue).await,
        },
        Command::Trigger { command } => match command {
            TriggerCommand::Add { trigger, schedule, function, zone, data, data_file, disabled } => {
                let input = read_input(data, data_file)?;
                let mut spec = serde_json::json!({ "schedule": schedule, "function": function, "enabled": !disabled });
                match String::from_utf8(input) {
                    Ok(text) => spec["input"] = text.into(),
                    Err(bytes) => {
                        use base64::Engine;
                        spec["input_base64"] =
                            base64::engine::general_purpose::STANDARD.encode(bytes.as_bytes()).into();
                    }
                }
                if let Some(zone) = zone {
                    spec["zone"] = zone.into();
                }
                client.trigger_put(&trigger, &spec).await
            }
            TriggerCommand::Ls { tenant } => client.trigger_list(&tenant).await,
            TriggerCommand::Rm { trigger } => client.trigger_remove(&trigger).await,
        },
        Command::Secret { command } => match command {
            SecretCommand::Set { tenant, name, value_file } => {
                let value = match value_file {
                    Some(path) => std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                    None => {
                        let mut value = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut value).context("reading the value")?;
                        value
                    }
                };
                // A value typed or piped with a final newline means the line.
                let value = value.strip_suffix(b"\n").map(<[u8]>::to_vec).unwrap_or(value);
                client.secret_set(&tenant, &name, value).await
            }
            SecretCommand::Rm { tenant, name } => client.secret_remove(&tenant, &name).await,
            SecretCommand::Ls { tenant } => client.secret_list(&tenant).await,
        },
    }
}

fn main() -> ExitCode {
    // Before any thread: a node gives back what compiles and loads freed.
    shoal_runtime::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
