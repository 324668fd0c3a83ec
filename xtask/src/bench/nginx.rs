//! nginx from Debian inside the pod namespace, as the classic sidecar: a
//! plain reverse proxy, or one that verifies the RS256 token with njs
//! through `auth_request` first.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::bench::{proc_stats, server};
use crate::process;

/// Port nginx listens on inside the pod, next to the service's ports.
pub const NGINX_PORT: u16 = 8181;

/// The njs module that Debian's `libnginx-mod-http-js` installs.
pub const NJS_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_js_module.so";

/// Upstream keep-alive connections per worker: more than the benchmark's
/// client connections, so no request waits for a new upstream connection.
const UPSTREAM_KEEPALIVE: u32 = 128;

/// Connections per worker: room for the idle-connection measurement
/// (thousands of client connections) plus the upstream keep-alive pool,
/// below the open-file limit that nginx inherits from the benchmark.
const WORKER_CONNECTIONS: u32 = 16_384;

/// Which nginx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Njs,
}

/// Expected key, issuer, audience and role of the njs verifier, the same as
/// in the agent's benchmark config.
pub struct VerifierSpec<'a> {
    /// Base64 DER `SubjectPublicKeyInfo` of the RS256 key.
    pub spki_base64: &'a str,
    pub kid: &'a str,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub role: &'a str,
}

/// A running nginx. Drop stops it and its workers.
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
}

/// Returns the base64 DER public key of the private key in `pem_path`,
/// from `openssl pkey -pubout`.
///
/// njs 0.7.9 (Debian 12) rejects `importKey("jwk", …)` for RSA keys, so the
/// verifier imports the same key as SPKI instead.
pub fn spki_base64(pem_path: &Path) -> anyhow::Result<String> {
    let mut command = Command::new("openssl");
    command.args(["pkey", "-pubout", "-in"]).arg(pem_path);
    let Some(pem) = process::probe(&mut command) else {
        bail!("`{}` failed", process::describe(&command));
    };
    Ok(pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect::<String>())
}

impl Nginx {
    /// Writes the config (and the verifier) into `dir` and starts nginx in
    /// `netns`, master and one worker pinned to `cpu`.
    pub fn start(
        dir: &Path,
        netns: &str,
        listen: SocketAddr,
        upstream_port: u16,
        cpu: &str,
        mode: Mode,
        verifier: &VerifierSpec<'_>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let config_path = dir.join("nginx.conf");
        let script_path = dir.join("verify.js");
        if mode == Mode::Njs {
            write_file(&script_path, &njs_verifier(verifier))?;
        }
        write_file(
            &config_path,
            &config(dir, listen, upstream_port, mode, &script_path),
        )?;

        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, "taskset", "-c", cpu, "nginx", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&config_path);
        let line = process::describe(&command);
        println!("+ {line}");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        let mut nginx = Self {
            child,
            addr: listen,
        };
        server::wait_listening(
            "nginx",
            &mut nginx.child,
            nginx.addr,
            &dir.join("logs/error.log"),
        )?;
        Ok(nginx)
    }

    /// Returns the master and the workers.
    pub fn pids(&self) -> Vec<u32> {
        proc_stats::process_tree(self.child.id())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown: the master stops its workers.
        let pids = self.pids();
        server::stop(&mut self.child, &pids);
    }
}

fn write_file(path: &PathBuf, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// Renders nginx.conf: one worker, no access log, HTTP/1.1 keep-alive to
/// the service on the pod's loopback, and for [`Mode::Njs`] an
/// `auth_request` to a location that runs the njs verifier.
fn config(dir: &Path, listen: SocketAddr, upstream_port: u16, mode: Mode, script: &Path) -> String {
    let dir = dir.display();
    let mut text = String::new();
    if mode == Mode::Njs {
        let _ = writeln!(text, "load_module {NJS_MODULE};");
    }
    let _ = write!(
        text,
        "daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
"
    );
    if mode == Mode::Njs {
        let _ = writeln!(text, "    js_import verifier from {};", script.display());
    }
    let _ = write!(
        text,
        "
    upstream service {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
    }}

    server {{
        listen {listen};

        location / {{
"
    );
    if mode == Mode::Njs {
        text.push_str("            auth_request /_verify;\n");
    }
    text.push_str(
        "            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
",
    );
    if mode == Mode::Njs {
        text.push_str(
            "
        location = /_verify {
            internal;
            js_content verifier.verify;
        }
",
        );
    }
    text.push_str("    }\n}\n");
    text
}

/// Renders the njs verifier. It checks what the agent checks for the same
/// token (RS256 signature with the issuer's key, `kid`, `iss`, `aud`,
/// `exp`, `nbf` with 60 s leeway, and the role the rule requires), and
/// returns 204 to allow, 401 or 403 to deny. njs has no state across
/// requests, so it imports the key on every request, as an njs sidecar
/// without a shared-dictionary cache does.
fn njs_verifier(spec: &VerifierSpec<'_>) -> String {
    format!(
        r#"// Verifies an RS256 bearer token for nginx's auth_request.
const SPKI = "{spki}";
const KID = "{kid}";
const ISSUER = "{issuer}";
const AUDIENCE = "{audience}";
const ROLE = "{role}";
const LEEWAY_SECONDS = 60;
const ALGORITHM = {{ name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" }};

function decodeJson(segment) {{
    return JSON.parse(Buffer.from(segment, "base64url").toString());
}}

function hasAudience(aud) {{
    return Array.isArray(aud) ? aud.includes(AUDIENCE) : aud === AUDIENCE;
}}

async function verify(r) {{
    const authorization = r.headersIn.Authorization || "";
    if (!authorization.startsWith("Bearer ")) {{
        r.return(401);
        return;
    }}
    const parts = authorization.slice(7).split(".");
    if (parts.length !== 3) {{
        r.return(401);
        return;
    }}

    let header;
    let claims;
    try {{
        header = decodeJson(parts[0]);
        claims = decodeJson(parts[1]);
    }} catch (e) {{
        r.return(401);
        return;
    }}
    if (header.alg !== "RS256" || header.kid !== KID) {{
        r.return(401);
        return;
    }}

    const key = await crypto.subtle.importKey(
        "spki", Buffer.from(SPKI, "base64"), ALGORITHM, false, ["verify"]);
    const valid = await crypto.subtle.verify(
        ALGORITHM, key, Buffer.from(parts[2], "base64url"),
        Buffer.from(parts[0] + "." + parts[1]));
    if (!valid) {{
        r.return(401);
        return;
    }}

    const now = Date.now() / 1000;
    if (claims.iss !== ISSUER || !hasAudience(claims.aud)
        || typeof claims.exp !== "number" || claims.exp + LEEWAY_SECONDS < now
        || (typeof claims.nbf === "number" && claims.nbf - LEEWAY_SECONDS > now)) {{
        r.return(401);
        return;
    }}
    if (!Array.isArray(claims.roles) || !claims.roles.includes(ROLE)) {{
        r.return(403);
        return;
    }}
    r.return(204);
}}

export default {{ verify }};
"#,
        spki = spec.spki_base64,
        kid = spec.kid,
        issuer = spec.issuer,
        audience = spec.audience,
        role = spec.role,
    )
}
