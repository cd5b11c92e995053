//! The client commands: plain HTTP calls to a node's API. The token comes
//! from `--token`/`SHOAL_TOKEN`, else `SHOAL_ADMIN_TOKEN`, else the admin
//! token file in the data directory, so on the machine running `shoal
//! serve` the commands work with no setup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::units::{parse_duration, parse_size};

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The node's base URL.
    #[arg(long, global = true, env = "SHOAL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token; defaults to the admin token of the local data directory.
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory to read the admin token from.
    #[arg(long = "client-data-dir", global = true, env = "SHOAL_DATA_DIR", default_value = ".shoal")]
    data_dir: PathBuf,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

fn read_token(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("admin.token")).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// `tenant/name`, split.
pub fn function_ref(text: &str) -> anyhow::Result<(&str, &str)> {
    match text.split_once('/') {
        Some((tenant, name)) if !tenant.is_empty() && !name.is_empty() && !name.contains('/') => Ok((tenant, name)),
        _ => bail!("{text:?} is not TENANT/NAME"),
    }
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = args
            .token
            .clone()
            .or_else(|| std::env::var("SHOAL_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()))
            .or_else(|| read_token(&args.data_dir));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { http, base: args.url.trim_end_matches('/').to_string(), token })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Send and turn an error response into a readable error.
    async fn send(&self, builder: RequestBuilder) -> anyhow::Result<Response> {
        let response = builder.send().await.with_context(|| format!("reaching the node at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let call_id = response
            .headers()
            .get("x-shoal-call-id")
            .and_then(|v| v.to_str().ok())
            .map(|id| format!(" (call {id})"))
            .unwrap_or_default();
        let body = response.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                Some(format!("{}: {}", e.get("kind")?.as_str()?, e.get("message")?.as_str()?))
            })
            .unwrap_or(body);
        if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            bail!(
                "{detail}; no token given (--token, SHOAL_TOKEN, or run where `shoal serve` keeps its data directory)"
            );
        }
        bail!("{detail}{call_id}")
    }

    async fn json(&self, builder: RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let response = self.send(builder).await?;
        response.json().await.context("reading the node's answer")
    }

    pub async fn deploy(&self, function: &str, file: &Path, options: &DeployOptions) -> anyhow::Result<()> {
        let DeployOptions { memory, timeout, env, snapshot, http, public, allow_host, secrets } = options;
        let (tenant, name) = function_ref(function)?;
        let (body, language) = crate::project::deploy_body(file)?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if *snapshot {
            query.push(("snapshot", "true".to_string()));
        }
        if *http {
            query.push(("http", "true".to_string()));
        }
        if *public {
            query.push(("access", "public".to_string()));
        }
        for host in allow_host {
            query.push(("allow_host", host.clone()));
        }
        for secret in secrets {
            query.push(("secret", secret.clone()));
        }
        if let Some(language) = language {
            query.push(("language", language.as_str().to_string()));
        }
        if let Some(memory) = memory {
            let bytes = parse_size(memory).map_err(anyhow::Error::msg)?;
            query.push(("memory_mb", (bytes.div_ceil(1 << 20)).to_string()));
        }
        if let Some(timeout) = timeout {
            query.push(("timeout_ms", parse_duration(timeout).map_err(anyhow::Error::msg)?.as_millis().to_string()));
        }
        let mut builder = self.request(Method::PUT, &format!("/v1/functions/{tenant}/{name}"));
        for var in env {
            if !var.contains('=') {
                bail!("--env {var:?} must be NAME=VALUE");
            }
            // In a header, not the URL (env vars are often secrets); a value
            // a header cannot carry (a line break) goes in the query.
            match reqwest::header::HeaderValue::from_str(var) {
                Ok(value) => builder = builder.header("shoal-env", value),
                Err(_) => query.push(("env", var.clone())),
            }
        }
        let builder = builder.query(&query).body(body);
        let described = self.json(builder).await?;
        println!("{}", serde_json::to_string_pretty(&described)?);
        Ok(())
    }

    /// Call a function and write its output to stdout as it is.
    pub async fn invoke(&self, function: &str, input: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let (tenant, name) = function_ref(function)?;
        let response =
            self.send(self.request(Method::POST, &format!("/v1/functions/{tenant}/{name}/invoke")).body(input)).await?;
        Ok(response.bytes().await.context("reading the output")?.to_vec())
    }

    /// Submit an asynchronous call; returns its id.
    pub async fn invoke_async(&self, function: &str, input: Vec<u8>) -> anyhow::Result<String> {
        let (tenant, name) = function_ref(function)?;
        let path = format!("/v1/functions/{tenant}/{name}/invoke?async=true");
        let accepted = self.json(self.request(Method::POST, &path).body(input)).await?;
        accepted["call_id"].as_str().map(str::to_string).context("the node's answer has no call id")
    }

    /// The record of an asynchronous call; with `wait`, polled until the
    /// call has finished.
    pub async fn call_get(&self, id: &str, wait: bool) -> anyhow::Result<serde_json::Value> {
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            let record = self.json(self.request(Method::GET, &format!("/v1/calls/{}", percent_encode(id)))).await?;
            let finished = matches!(record["status"].as_str(), Some("succeeded" | "failed"));
            if finished || !wait {
                return Ok(record);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(500));
        }
    }

    pub async fn list(&self, tenant: &str) -> anyhow::Result<()> {
        let listed = self.json(self.request(Method::GET, &format!("/v1/functions/{tenant}"))).await?;
        let functions = listed["functions"].as_array().cloned().unwrap_or_default();
        println!(
            "{:<24} {:<10} {:<8} {:>9} {:>9}  {:<12}  URL",
            "NAME", "KIND", "SNAPSHOT", "MEMORY", "TIMEOUT", "SHA-256"
        );
        for f in functions {
            println!(
                "{:<24} {:<10} {:<8} {:>6}MiB {:>7}ms  {:<12}  {}",
                format!("{tenant}/{}", f["name"].as_str().unwrap_or("?")),
                f["kind"].as_str().unwrap_or("?"),
                if f["snapshot"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                f["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                f["timeout_ms"].as_u64().unwrap_or(0),
                &f["sha256"].as_str().unwrap_or("?")[..12.min(f["sha256"].as_str().unwrap_or("?").len())],
                f["url"].as_str().unwrap_or("-"),
            );
        }
        Ok(())
    }

    /// `shoal usage`: the window summed, per function or for the tenant.
    pub async fn usage(&self, tenant: &str, by_function: bool, since: &str) -> anyhow::Result<()> {
        let window = crate::units::parse_duration(since).map_err(anyhow::Error::msg)?.as_secs().max(60);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        // One bucket covers the window (two when it straddles a boundary).
        let step = window.div_ceil(60) * 60;
        let by = if by_function { "function" } else { "tenant" };
        let path = format!("/v1/tenants/{tenant}/usage?from={}&to={now}&step={step}&by={by}", now - window);
        let answer = self.json(self.request(Method::GET, &path)).await?;
        let mut rows: std::collections::BTreeMap<String, [u64; 11]> = std::collections::BTreeMap::new();
        for bucket in answer["buckets"].as_array().cloned().unwrap_or_default() {
            let name =
                bucket["function"].as_str().map_or_else(|| format!("{tenant} (all)"), |f| format!("{tenant}/{f}"));
            let ok = bucket["outcomes"]["ok"].as_u64().unwrap_or(0);
            let calls = bucket["calls"].as_u64().unwrap_or(0);
            let field = |name: &str| bucket[name].as_u64().unwrap_or(0);
            let values = [
                calls,
                calls - ok.min(calls),
                field("cpu_us"),
                field("wall_us"),
                field("memory_mib_ms"),
                field("queued_us"),
                field("outbound_requests"),
                field("outbound_bytes"),
                field("spawned"),
                field("state_read_bytes") + field("state_written_bytes"),
                field("state_stored_bytes"),
            ];
            let row = rows.entry(name).or_default();
            for (i, (sum, value)) in row.iter_mut().zip(values).enumerate() {
                // Stored bytes are a gauge: the most seen, not a sum.
                *sum = if i == 10 { (*sum).max(value) } else { *sum + value };
            }
        }
        println!(
            "{:<28} {:>9} {:>7} {:>11} {:>11} {:>12} {:>10} {:>8} {:>12} {:>7} {:>12} {:>12}",
            "FUNCTION",
            "CALLS",
            "ERRORS",
            "CPU ms",
            "WALL ms",
            "MEM MiB·s",
            "QUEUED ms",
            "OUT REQ",
            "OUT BYTES",
            "SPAWNED",
            "STATE MOVED",
            "STATE KEPT"
        );
        for (name, [calls, errors, cpu, wall, mem, queued, out_req, out_bytes, spawned, moved, kept]) in rows {
            println!(
                "{name:<28} {calls:>9} {errors:>7} {:>11.1} {:>11.1} {:>12.1} {:>10.1} {out_req:>8} {out_bytes:>12} {spawned:>7} {moved:>12} {kept:>12}",
                cpu as f64 / 1000.0,
                wall as f64 / 1000.0,
                mem as f64 / 1000.0,
                queued as f64 / 1000.0,
            );
        }
        Ok(())
    }

    pub async fn remove(&self, function: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(function)?;
        self.send(self.request(Method::DELETE, &format!("/v1/functions/{tenant}/{name}"))).await?;
        eprintln!("removed {tenant}/{name}");
        Ok(())
    }

    /// `shoal logs`: the lines kept; with `follow`, then every new one as
    /// it comes (each request waits up to 30 s on the node for the next).
    pub async fn logs(&self, function: &str, follow: bool) -> anyhow::Result<()> {
        use std::io::Write;
        let (tenant, name) = function_ref(function)?;
        let (mut after, mut wait) = (0, 0);
        loop {
            let path = format!("/v1/functions/{tenant}/{name}/logs?after={after}&wait={wait}");
            let logs = self.json(self.request(Method::GET, &path).timeout(Duration::from_secs(45))).await?;
            let mut out = std::io::stdout().lock();
            for line in logs["lines"].as_array().cloned().unwrap_or_default() {
                after = after.max(line["seq"].as_u64().unwrap_or(0));
                let trace = line["trace_id"].as_str().map(|t| format!(" trace={t}")).unwrap_or_default();
                writeln!(
                    out,
                    "{}{trace} {} {}",
                    line["call_id"].as_str().unwrap_or("?"),
                    line["stream"].as_str().unwrap_or("?"),
                    line["line"].as_str().unwrap_or("")
                )?;
            }
            out.flush()?;
            if !follow {
                return Ok(());
            }
            wait = 30;
        }
    }

    /// `/v1/state/{tenant}/{key}` for TENANT/KEY. The key is one
    /// percent-encoded segment, its `/` escaped too: a key holding `..`
    /// segments (any tenant may write one) must never walk the request to
    /// another route with this token. A key of only `.` or `..` cannot be
    /// a path segment at all.
    fn state_path(key_ref: &str) -> anyhow::Result<String> {
        let Some((tenant, key)) = key_ref.split_once('/').filter(|(t, k)| !t.is_empty() && !k.is_empty()) else {
            bail!("{key_ref:?} is not TENANT/KEY");
        };
        if key == "." || key == ".." {
            bail!("the key {key:?} cannot be addressed in a URL");
        }
        Ok(format!("/v1/state/{}/{}", percent_encode(tenant), percent_encode(key)))
    }

    pub async fn state_get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let response = self.send(self.request(Method::GET, &Self::state_path(key)?)).await?;
        Ok(response.bytes().await.context("reading the value")?.to_vec())
    }

    pub async fn state_set(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        self.send(self.request(Method::PUT, &Self::state_path(key)?).body(value)).await?;
        Ok(())
    }

    pub async fn state_delete(&self, key: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, &Self::state_path(key)?)).await?;
        Ok(())
    }

    pub async fn state_list(&self, tenant: &str) -> anyhow::Result<()> {
        let listed = self.json(self.request(Method::GET, &format!("/v1/state/{tenant}"))).await?;
        for entry in listed["keys"].as_array().cloned().unwrap_or_default() {
            println!("{:>10}  {}", entry["size"].as_u64().unwrap_or(0), entry["key"].as_str().unwrap_or("?"));
        }
        Ok(())
    }

    pub async fn secret_set(&self, tenant: &str, name: &str, value: Vec<u8>) -> anyhow::Result<()> {
        self.send(self.request(Method::PUT, &format!("/v1/tenants/{tenant}/secrets/{name}")).body(value)).await?;
        eprintln!("set {tenant}'s secret {name}");
        Ok(())
    }

    pub async fn secret_remove(&self, tenant: &str, name: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, &format!("/v1/tenants/{tenant}/secrets/{name}"))).await?;
        eprintln!("removed {tenant}'s secret {name}");
        Ok(())
    }

    pub async fn secret_list(&self, tenant: &str) -> anyhow::Result<()> {
        let listed = self.json(self.request(Method::GET, &format!("/v1/tenants/{tenant}/secrets"))).await?;
        println!("{:<32} {:>15}  USED BY", "NAME", "SET (UNIX MS)");
        for secret in listed["secrets"].as_array().cloned().unwrap_or_default() {
            let used_by: Vec<&str> =
                secret["used_by"].as_array().map(|a| a.iter().filter_map(|f| f.as_str()).collect()).unwrap_or_default();
            println!(
                "{:<32} {:>15}  {}",
                secret["name"].as_str().unwrap_or("?"),
                secret["updated_ms"].as_u64().unwrap_or(0),
                if used_by.is_empty() { "-".to_string() } else { used_by.join(",") }
            );
        }
        Ok(())
    }

    /// `shoal versions`: the versions kept, newest first.
    pub async fn versions(&self, function: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(function)?;
        let listed = self.json(self.request(Method::GET, &format!("/v1/functions/{tenant}/{name}/versions"))).await?;
        println!("{:<8} {:<20} {:<12} {:>9} {:>9}  ALIASES", "VERSION", "DEPLOYED", "SHA-256", "MEMORY", "TIMEOUT");
        for v in listed["versions"].as_array().cloned().unwrap_or_default() {
            let aliases: Vec<&str> =
                v["aliases"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
            let sha = v["sha256"].as_str().unwrap_or("?");
            println!(
                "{:<8} {:<20} {:<12} {:>6}MiB {:>7}ms  {}",
                v["version"].as_u64().unwrap_or(0),
                v["deployed_ms"].as_u64().map_or_else(|| "-".to_string(), utc),
                &sha[..12.min(sha.len())],
                v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                v["timeout_ms"].as_u64().unwrap_or(0),
                if aliases.is_empty() { "-".to_string() } else { aliases.join(",") }
            );
        }
        Ok(())
    }

    /// `shoal alias set`.
    pub async fn alias_set(&self, function: &str, alias: &str, target: &serde_json::Value) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(function)?;
        let path = format!("/v1/functions/{tenant}/{name}/aliases/{alias}");
        let set = self.json(self.request(Method::PUT, &path).json(target)).await?;
        eprintln!("{tenant}/{name}@{alias} → {}", routes_text(&set["versions"]));
        Ok(())
    }

    /// `shoal alias ls`.
    pub async fn alias_list(&self, function: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(function)?;
        let listed = self.json(self.request(Method::GET, &format!("/v1/functions/{tenant}/{name}/aliases"))).await?;
        println!("{:<24} ROUTES TO", "ALIAS");
        for (alias, target) in listed["aliases"].as_object().cloned().unwrap_or_default() {
            println!("{alias:<24} {}", routes_text(&target["versions"]));
        }
        Ok(())
    }

    /// `shoal alias rm`.
    pub async fn alias_remove(&self, function: &str, alias: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(function)?;
        self.send(self.request(Method::DELETE, &format!("/v1/functions/{tenant}/{name}/aliases/{alias}"))).await?;
        eprintln!("removed {tenant}/{name}@{alias}");
        Ok(())
    }

    /// `shoal queue add`.
    pub async fn queue_put(&self, queue: &str, spec: &serde_json::Value) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(queue)?;
        // Unset settings take the node's defaults.
        let spec: serde_json::Map<String, serde_json::Value> =
            spec.as_object().cloned().unwrap_or_default().into_iter().filter(|(_, v)| !v.is_null()).collect();
        let view = self.json(self.request(Method::PUT, &format!("/v1/queues/{tenant}/{name}")).json(&spec)).await?;
        eprintln!(
            "set queue {tenant}/{name}: consumed by {} in batches of up to {}",
            view["consumer"].as_str().unwrap_or("?"),
            view["batch_size"]
        );
        Ok(())
    }

    /// `shoal queue ls`.
    pub async fn queue_list(&self, tenant: &str) -> anyhow::Result<()> {
        let listed = self.json(self.request(Method::GET, &format!("/v1/queues/{tenant}"))).await?;
        println!(
            "{:<24} {:<20} {:>10} {:>8} {:>8} {:>10} {:>10} {:>8}",
            "QUEUE", "CONSUMER", "MESSAGES", "DEAD", "RUNNING", "ACKED", "RETRIED", "DIED"
        );
        for q in listed["queues"].as_array().cloned().unwrap_or_default() {
            println!(
                "{:<24} {:<20} {:>10} {:>8} {:>8} {:>10} {:>10} {:>8}",
                q["name"].as_str().unwrap_or("?"),
                q["consumer"].as_str().unwrap_or("?"),
                q["messages"],
                q["dead"],
                q["batches_running"],
                q["acked"],
                q["retried"],
                q["died"]
            );
        }
        Ok(())
    }

    /// `shoal queue send`: the messages, 1,000 per request.
    pub async fn queue_send(&self, queue: &str, messages: Vec<Vec<u8>>) -> anyhow::Result<()> {
        use base64::Engine;
        let (tenant, name) = function_ref(queue)?;
        let path = format!("/v1/queues/{tenant}/{name}/messages");
        let mut sent = 0;
        for chunk in messages.chunks(1000) {
            let encoded: Vec<serde_json::Value> = chunk
                .iter()
                .map(|m| match std::str::from_utf8(m) {
                    Ok(text) => serde_json::json!({ "body": text }),
                    Err(_) => serde_json::json!({ "body_base64": base64::engine::general_purpose::STANDARD.encode(m) }),
                })
                .collect();
            let answer =
                self.json(self.request(Method::POST, &path).json(&serde_json::json!({ "messages": encoded }))).await?;
            for id in answer["ids"].as_array().cloned().unwrap_or_default() {
                println!("{}", id.as_str().unwrap_or("?"));
            }
            sent += chunk.len();
        }
        eprintln!("sent {sent} message(s) to {tenant}/{name}");
        Ok(())
    }

    /// `shoal queue dead`.
    pub async fn queue_dead(&self, queue: &str, limit: usize) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(queue)?;
        let dead =
            self.json(self.request(Method::GET, &format!("/v1/queues/{tenant}/{name}/dead?limit={limit}"))).await?;
        println!("{}", serde_json::to_string_pretty(&dead["dead"])?);
        Ok(())
    }

    /// `shoal queue redrive` and `purge`.
    pub async fn queue_dead_settle(&self, queue: &str, purge: bool) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(queue)?;
        let answer = if purge {
            self.json(self.request(Method::DELETE, &format!("/v1/queues/{tenant}/{name}/dead"))).await?
        } else {
            self.json(self.request(Method::POST, &format!("/v1/queues/{tenant}/{name}/dead/redrive"))).await?
        };
        let (what, n) = if purge { ("purged", &answer["purged"]) } else { ("redriven", &answer["redriven"]) };
        eprintln!("{what} {n} dead letter(s) of {tenant}/{name}");
        Ok(())
    }

    /// `shoal queue rm`.
    pub async fn queue_remove(&self, queue: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(queue)?;
        self.send(self.request(Method::DELETE, &format!("/v1/queues/{tenant}/{name}"))).await?;
        eprintln!("removed queue {tenant}/{name}");
        Ok(())
    }

    /// `shoal trigger add`: create or replace TENANT/NAME's trigger.
    pub async fn trigger_put(&self, trigger: &str, spec: &serde_json::Value) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(trigger)?;
        let view = self.json(self.request(Method::PUT, &format!("/v1/triggers/{tenant}/{name}")).json(spec)).await?;
        let next = view["next_run_ms"].as_u64().map_or_else(|| "never".to_string(), utc);
        eprintln!("set trigger {tenant}/{name}: {} runs next at {next}", view["function"].as_str().unwrap_or("?"));
        Ok(())
    }

    /// `shoal trigger rm`.
    pub async fn trigger_remove(&self, trigger: &str) -> anyhow::Result<()> {
        let (tenant, name) = function_ref(trigger)?;
        self.send(self.request(Method::DELETE, &format!("/v1/triggers/{tenant}/{name}"))).await?;
        eprintln!("removed trigger {tenant}/{name}");
        Ok(())
    }

    /// `shoal trigger ls`: each trigger with its schedule, last and next run.
    pub async fn trigger_list(&self, tenant: &str) -> anyhow::Result<()> {
        let listed = self.json(self.request(Method::GET, &format!("/v1/triggers/{tenant}"))).await?;
        println!(
            "{:<24} {:<20} {:<16} {:<16} {:<20} {:<20} LAST CALL",
            "NAME", "SCHEDULE", "ZONE", "FUNCTION", "LAST RUN", "NEXT RUN"
        );
        for t in listed["triggers"].as_array().cloned().unwrap_or_default() {
            let last = &t["last_run"];
            let next = match (t["enabled"].as_bool(), t["next_run_ms"].as_u64()) {
                (Some(false), _) => "disabled".to_string(),
                (_, Some(ms)) => utc(ms),
                (_, None) => "never".to_string(),
            };
            println!(
                "{:<24} {:<20} {:<16} {:<16} {:<20} {:<20} {}",
                t["name"].as_str().unwrap_or("?"),
                t["schedule"].as_str().unwrap_or("?"),
                t["zone"].as_str().unwrap_or("UTC"),
                t["function"].as_str().unwrap_or("?"),
                last["tick_ms"].as_u64().map_or_else(|| "-".to_string(), utc),
                next,
                last["call_id"].as_str().unwrap_or("-"),
            );
            if let Some(refusal) = t["last_refusal"].as_str() {
                println!("  last tick refused: {refusal}");
            }
        }
        Ok(())
    }

    pub async fn create_tenant(&self, name: &str) -> anyhow::Result<()> {
        let created =
            self.json(self.request(Method::POST, "/v1/tenants").json(&serde_json::json!({ "name": name }))).await?;
        eprintln!("created tenant {name}; its token (shown once):");
        println!("{}", created["token"].as_str().unwrap_or(""));
        Ok(())
    }
}

impl Client {
    /// Delete `tenant`; with `wait`, poll its status until it is gone.
    pub async fn delete_tenant(&self, tenant: &str, wait: bool) -> anyhow::Result<()> {
        let path = format!("/v1/tenants/{}", percent_encode(tenant));
        self.send(self.request(Method::DELETE, &path)).await?;
        if !wait {
            eprintln!("deleting tenant {tenant} (`shoal tenant rm {tenant} --wait` waits until it is gone)");
            return Ok(());
        }
        loop {
            let response = self.request(Method::GET, &path).send().await.context("reaching the node")?;
            if response.status() == StatusCode::NOT_FOUND {
                eprintln!("deleted tenant {tenant}");
                return Ok(());
            }
            self.send(self.request(Method::GET, &path)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Give `tenant` a new token and print it; the old one stays valid for `grace`.
    pub async fn rotate_token(&self, tenant: &str, grace: Duration) -> anyhow::Result<()> {
        let path = format!("/v1/tenants/{}/token", percent_encode(tenant));
        let body = serde_json::json!({ "grace_seconds": grace.as_secs() });
        let rotated = self.json(self.request(Method::POST, &path).json(&body)).await?;
        eprintln!("new token for tenant {tenant} (shown once); the old one stays valid for {} s:", grace.as_secs());
        println!("{}", rotated["token"].as_str().unwrap_or(""));
        Ok(())
    }

    /// Refuse every token of `tenant` from now on.
    pub async fn revoke_tokens(&self, tenant: &str) -> anyhow::Result<()> {
        let path = format!("/v1/tenants/{}/token", percent_encode(tenant));
        self.send(self.request(Method::DELETE, &path)).await?;
        eprintln!("revoked every token of tenant {tenant}");
        Ok(())
    }

    /// Show `tenant`'s limits; with `changes` (or `reset`), set them first:
    /// what was set, less everything if `reset`, with `changes` over it.
    pub async fn tenant_limits(
        &self,
        tenant: &str,
        changes: &[(&str, Option<u64>)],
        reset: bool,
    ) -> anyhow::Result<()> {
        let path = format!("/v1/tenants/{}/limits", percent_encode(tenant));
        let mut shown = self.json(self.request(Method::GET, &path)).await?;
        if reset || changes.iter().any(|(_, value)| value.is_some()) {
            let mut set = if reset { serde_json::json!({}) } else { shown["set"].clone() };
            for (field, value) in changes {
                if let Some(value) = value {
                    set[*field] = serde_json::json!(value);
                }
            }
            shown = self.json(self.request(Method::PUT, &path).json(&set)).await?;
        }
        println!("{}", serde_json::to_string_pretty(&shown)?);
        Ok(())
    }
}

/// Percent-encode everything but unreserved characters (RFC 3986).
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths_encode_each_segment() {
        assert_eq!(Client::state_path("demo/counter").unwrap(), "/v1/state/demo/counter");
        assert_eq!(Client::state_path("demo/conf/a b").unwrap(), "/v1/state/demo/conf%2Fa%20b");
        assert_eq!(Client::state_path("demo/../../tenants/x").unwrap(), "/v1/state/demo/..%2F..%2Ftenants%2Fx");
        assert!(Client::state_path("demo/..").is_err());
        assert_eq!(Client::state_path("demo/x?y#z%").unwrap(), "/v1/state/demo/x%3Fy%23z%25");
        assert!(Client::state_path("demo").is_err());
        assert!(Client::state_path("/k").is_err());
    }
}

/// How `shoal deploy` deploys.
#[derive(Debug, Default)]
pub struct DeployOptions {
    pub memory: Option<String>,
    pub timeout: Option<String>,
    pub env: Vec<String>,
    pub snapshot: bool,
    pub http: bool,
    pub public: bool,
    pub allow_host: Vec<String>,
    pub secrets: Vec<String>,
}

/// Unix milliseconds as a UTC time to the second.
fn utc(ms: u64) -> String {
    let ts = i64::try_from(ms).ok().and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok());
    ts.map_or_else(|| ms.to_string(), |ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// An alias's routes: `version 3`, or `3 (90%), 4 (10%)`.
fn routes_text(routes: &serde_json::Value) -> String {
    let routes = routes.as_array().cloned().unwrap_or_default();
    let total: u64 = routes.iter().filter_map(|r| r["weight"].as_u64()).sum();
    match routes.as_slice() {
        [one] => format!("version {}", one["version"].as_u64().unwrap_or(0)),
        _ => routes
            .iter()
            .map(|r| {
                let share = r["weight"].as_u64().unwrap_or(0) as f64 * 100.0 / total.max(1) as f64;
                format!("{} ({share:.0}%)", r["version"].as_u64().unwrap_or(0))
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}
