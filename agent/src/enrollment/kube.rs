//! Pod lookup in the Kubernetes API: `GET /api/v1/namespaces/{ns}/pods/{name}`
//! with the service-account token, over HTTPS verified by the cluster CA.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;

use super::pod::Pod;
use crate::config::KubernetesConfig;

/// Maximum size of a Pod object read from the API, in bytes. The API server
/// limits an object to about 1.5 MiB (the etcd request limit), so a larger
/// body is not a pod.
const MAX_POD_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes API server configured; set enrollment.kubernetes.api_server or run in a pod with KUBERNETES_SERVICE_HOST")]
    NoApiServer,
    #[error("failed to read the CA bundle {path}; set enrollment.kubernetes.ca_file")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid CA bundle {path}; it must contain PEM certificates")]
    InvalidCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to build the Kubernetes API client")]
    Client {
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "failed to read the service-account token {path}; set enrollment.kubernetes.token_file"
    )]
    ReadToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("request for pod {namespace}/{name} to {url} failed")]
    Request {
        namespace: String,
        name: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("pod {namespace}/{name} not found in the Kubernetes API")]
    NotFound { namespace: String, name: String },
    #[error("Kubernetes API returned {status} for pod {namespace}/{name}; check the agent's RBAC (get pods)")]
    Status {
        namespace: String,
        name: String,
        status: StatusCode,
    },
    #[error("Kubernetes API returned a pod {namespace}/{name} larger than {MAX_POD_BYTES} bytes or not valid JSON")]
    Body { namespace: String, name: String },
}

/// A client for pod lookups.
#[derive(Clone, Debug)]
pub struct KubeClient {
    base_url: String,
    token_file: PathBuf,
    client: reqwest::Client,
}

impl KubeClient {
    /// Builds the client from `config` and, for the API address, the
    /// in-cluster `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`
    /// values passed in `host` and `port`.
    pub fn new(
        config: &KubernetesConfig,
        host: Option<&str>,
        port: Option<&str>,
    ) -> Result<Self, KubeError> {
        let base_url = config
            .api_server_url(host, port)
            .ok_or(KubeError::NoApiServer)?;
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_seconds))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")));

        if base_url.starts_with("https://") {
            let pem = std::fs::read(&config.ca_file).map_err(|source| KubeError::ReadCa {
                path: config.ca_file.clone(),
                source,
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                KubeError::InvalidCa {
                    path: config.ca_file.clone(),
                    source,
                }
            })?;
            // Only the cluster CA vouches for the API server.
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }

        let client = builder
            .build()
            .map_err(|source| KubeError::Client { source })?;
        Ok(Self {
            base_url,
            token_file: config.token_file.clone(),
            client,
        })
    }

    /// Fetches pod `namespace`/`name`. The token file is read for each
    /// request, because the kubelet rotates bound service-account tokens.
    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| KubeError::ReadToken {
                path: self.token_file.clone(),
                source,
            })?;
        let url = format!(
            "{}/api/v1/namespaces/{namespace}/pods/{name}",
            self.base_url
        );
        let request_error = |source| KubeError::Request {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            url: url.clone(),
            source,
        };

        let response = self
            .client
            .get(&url)
            .bearer_auth(token.trim())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(request_error)?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(KubeError::NotFound {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            status => {
                return Err(KubeError::Status {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    status,
                })
            }
        }

        let body_error = || KubeError::Body {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_POD_BYTES as u64)
        {
            return Err(body_error());
        }
        let body = response.bytes().await.map_err(request_error)?;
        if body.len() > MAX_POD_BYTES {
            return Err(body_error());
        }
        serde_json::from_slice(&body).map_err(|_| body_error())
    }
}
