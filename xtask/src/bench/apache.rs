//! Apache httpd from Debian inside the pod namespace with `mod_auth_openidc`
//! as an OAuth 2.0 resource server. It validates the bearer token's
//! signature against the issuer's JWKS and requires the same `iss`, `aud`
//! and role as the agent's rule. Then it proxies to the service.
//!
//! The issuer listens on the host's loopback, which the pod namespace cannot
//! reach, so httpd serves the same JWKS document itself and fetches it from
//! its own listener. `mod_auth_openidc` 2.4.12 accepts only an `https` JWKS
//! URI, so that listener is a TLS one on the pod's loopback with a
//! self-signed certificate and server validation off.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::bench::{proc_stats, server};
use crate::process;

/// Port httpd listens on inside the pod, next to nginx's and the service's.
pub const APACHE_PORT: u16 = 8282;

/// Debian's httpd binary.
pub const APACHE_BIN: &str = "/usr/sbin/apache2";

/// The module that Debian's `libapache2-mod-auth-openidc` installs.
pub const OPENIDC_MODULE: &str = "/usr/lib/apache2/modules/mod_auth_openidc.so";

/// Directory of Debian's httpd modules.
const MODULE_DIR: &str = "/usr/lib/apache2/modules";

/// Request path of the JWKS document that httpd serves to itself.
const JWKS_PATH: &str = "/jwks.json";

/// The TLS listener on the pod's loopback that serves the JWKS.
const JWKS_LISTEN: &str = "127.0.0.1:8443";

/// Worker threads of the single httpd process: more than the benchmark's
/// client connections, so no connection waits for a thread.
const THREADS: u32 = 64;

/// Claims that httpd requires, the same as the agent's benchmark rule.
pub struct Requirements<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub role: &'a str,
    /// Path prefix that httpd protects and proxies.
    pub path_prefix: &'a str,
}

/// A running httpd. Drop stops it and removes its directory.
pub struct Apache {
    child: Child,
    addr: SocketAddr,
    /// httpd's children drop root and run as `nobody`, so they need a
    /// directory they can read, apart from the benchmark's private one.
    dir: ReadableDir,
}

impl Apache {
    /// Writes the config and the JWKS into a new directory and starts httpd
    /// in `netns`, pinned to `cpu`.
    pub fn start(
        netns: &str,
        listen: SocketAddr,
        upstream_port: u16,
        cpu: &str,
        jwks_json: &str,
        requirements: &Requirements<'_>,
    ) -> anyhow::Result<Self> {
        let dir = ReadableDir::new("tokengate-bench-apache")?;
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root)
            .with_context(|| format!("failed to create {}", root.display()))?;
        write_file(&root.join(JWKS_PATH.trim_start_matches('/')), jwks_json)?;
        self_signed_certificate(dir.path())?;
        let config_path = dir.path().join("httpd.conf");
        write_file(
            &config_path,
            &config(dir.path(), listen, upstream_port, requirements),
        )?;

        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, "taskset", "-c", cpu, APACHE_BIN])
            .arg("-f")
            .arg(&config_path)
            .arg("-DFOREGROUND");
        let line = process::describe(&command);
        println!("+ {line}");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        let mut apache = Self {
            child,
            addr: listen,
            dir,
        };
        server::wait_listening(
            "httpd",
            &mut apache.child,
            apache.addr,
            &apache.dir.path().join("error.log"),
        )?;
        Ok(apache)
    }

    /// Returns the parent process and its children.
    pub fn pids(&self) -> Vec<u32> {
        proc_stats::process_tree(self.child.id())
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        // SIGTERM stops httpd and its children at once.
        let pids = self.pids();
        server::stop(&mut self.child, &pids);
    }
}

/// Writes `cert.pem` and `key.pem` into `dir` with `openssl req`: a
/// one-day self-signed certificate for the JWKS listener.
fn self_signed_certificate(dir: &Path) -> anyhow::Result<()> {
    let mut command = Command::new("openssl");
    command
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"));
    let mut quiet = command;
    quiet.stderr(Stdio::null());
    process::run(&mut quiet).context("failed to make httpd's self-signed certificate")
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// Renders httpd.conf: one process of the event MPM with [`THREADS`]
/// threads, no access log and keep-alive without a request limit. The JWKS
/// is served from the document root on the TLS listener. Under the
/// protected prefix an `oauth20` check requires every claim (`RequireAll`).
fn config(
    dir: &Path,
    listen: SocketAddr,
    upstream_port: u16,
    requirements: &Requirements<'_>,
) -> String {
    let dir = dir.display();
    let mut text = String::new();
    for (name, file) in [
        ("mpm_event_module", "mod_mpm_event.so"),
        ("authn_core_module", "mod_authn_core.so"),
        ("authz_core_module", "mod_authz_core.so"),
        ("proxy_module", "mod_proxy.so"),
        ("proxy_http_module", "mod_proxy_http.so"),
        ("socache_shmcb_module", "mod_socache_shmcb.so"),
        ("ssl_module", "mod_ssl.so"),
        ("auth_openidc_module", "mod_auth_openidc.so"),
    ] {
        let _ = writeln!(text, "LoadModule {name} {MODULE_DIR}/{file}");
    }
    let prefix = requirements.path_prefix;
    let _ = write!(
        text,
        r"ServerRoot {dir}
ServerName bench.test
Listen {listen}
PidFile {dir}/httpd.pid
ErrorLog {dir}/error.log
LogLevel warn
User nobody
Group nogroup
DocumentRoot {dir}/www

StartServers 1
ServerLimit 1
ThreadLimit {THREADS}
ThreadsPerChild {THREADS}
MaxRequestWorkers {THREADS}
MinSpareThreads 1
MaxSpareThreads {THREADS}
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 60

OIDCOAuthVerifyJwksUri https://{JWKS_LISTEN}{JWKS_PATH}
OIDCOAuthRemoteUserClaim sub
OIDCOAuthSSLValidateServer Off

Listen {JWKS_LISTEN}
<VirtualHost {JWKS_LISTEN}>
    SSLEngine on
    SSLCertificateFile {dir}/cert.pem
    SSLCertificateKeyFile {dir}/key.pem
</VirtualHost>

<Directory {dir}/www>
    Require all granted
</Directory>

<Location {prefix}>
    AuthType oauth20
    <RequireAll>
        Require claim iss:{issuer}
        Require claim aud:{audience}
        Require claim roles:{role}
    </RequireAll>
    ProxyPass http://127.0.0.1:{upstream_port}{prefix}
</Location>
",
        issuer = requirements.issuer,
        audience = requirements.audience,
        role = requirements.role,
    );
    text
}

/// A temporary directory that every user may read, removed on drop.
struct ReadableDir {
    path: PathBuf,
}

impl ReadableDir {
    /// Creates `TMPDIR/PREFIX-PID-NANOS` with mode 0755.
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        let dir = Self { path };
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("failed to make {} readable", dir.path.display()))?;
        Ok(dir)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ReadableDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_requires_every_claim_under_prefix() {
        let text = config(
            Path::new("/tmp/x"),
            "198.18.0.2:8282".parse().expect("address"),
            9090,
            &Requirements {
                issuer: "https://issuer.test",
                audience: "orders",
                role: "orders.read",
                path_prefix: "/orders",
            },
        );

        assert!(text.contains("OIDCOAuthVerifyJwksUri https://127.0.0.1:8443/jwks.json"));
        assert!(text.contains("<Location /orders>\n    AuthType oauth20\n    <RequireAll>"));
        assert!(text.contains("Require claim iss:https://issuer.test"));
        assert!(text.contains("Require claim roles:orders.read"));
        assert!(text.contains("ProxyPass http://127.0.0.1:9090/orders"));
    }
}
