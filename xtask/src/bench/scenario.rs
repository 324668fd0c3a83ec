//! The benchmark's scenarios: what sits between the load generator and the
//! service, and which tokens the requests carry.

use anyhow::bail;

/// Token mix of a tokengate scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// One token repeated by every request: after the first request, every
    /// verification is a cache hit.
    Hit,
    /// A cycle through the unique-token file. The file contains twice the
    /// agent's default cache capacity of 10,000 entries, and the cache
    /// evicts the least recently used entry, so nearly every lookup misses.
    /// The report shows the measured hit share.
    Miss,
}

/// One scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Straight to the service's unprotected port: the limit.
    Direct,
    /// The protected port, steered by eBPF to the agent, verified.
    Tokengate { alg: &'static str, mix: Mix },
    /// nginx in the pod verifying RS256 with njs through `auth_request`.
    NginxNjs,
    /// nginx in the pod as a plain reverse proxy.
    NginxPlain,
    /// The second pod's protected port, steered to an agent with
    /// `interception.sockmap: true`, one RS256 token repeated.
    TokengateSockmap,
    /// Apache httpd in the pod validating the RS256 token with
    /// `mod_auth_openidc` against the JWKS.
    ApacheOpenidc,
}

/// Returns every scenario in run order.
pub fn all() -> Vec<Scenario> {
    let mut scenarios = vec![Scenario::Direct];
    for alg in ["RS256", "ES256", "EdDSA"] {
        scenarios.push(Scenario::Tokengate { alg, mix: Mix::Hit });
        scenarios.push(Scenario::Tokengate {
            alg,
            mix: Mix::Miss,
        });
    }
    scenarios.push(Scenario::TokengateSockmap);
    scenarios.push(Scenario::NginxNjs);
    scenarios.push(Scenario::NginxPlain);
    scenarios.push(Scenario::ApacheOpenidc);
    scenarios
}

impl Scenario {
    /// Name on the command line and in the report.
    pub fn name(self) -> String {
        match self {
            Self::Direct => "direct".to_owned(),
            Self::Tokengate { alg, mix } => {
                let mix = match mix {
                    Mix::Hit => "hit",
                    Mix::Miss => "miss",
                };
                format!("tokengate-{}-{mix}", alg.to_lowercase())
            }
            Self::NginxNjs => "nginx-njs".to_owned(),
            Self::NginxPlain => "nginx-plain".to_owned(),
            Self::TokengateSockmap => "tokengate-sockmap".to_owned(),
            Self::ApacheOpenidc => "apache-openidc".to_owned(),
        }
    }
}

/// Selects the scenarios named in `names`, in run order; every scenario
/// when `names` is empty.
pub fn select(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    let all = all();
    if names.is_empty() {
        return Ok(all);
    }
    for name in names {
        if !all.iter().any(|scenario| scenario.name() == *name) {
            let known: Vec<String> = all.iter().map(|scenario| scenario.name()).collect();
            bail!(
                "unknown scenario {name:?}; choose from {}",
                known.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|scenario| names.contains(&scenario.name()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_run_order() {
        let names = vec!["nginx-plain".to_owned(), "direct".to_owned()];

        let selected = select(&names).expect("known names");

        assert_eq!(selected, vec![Scenario::Direct, Scenario::NginxPlain]);
    }

    #[test]
    fn select_rejects_unknown_name() {
        let error = select(&["envoy".to_owned()]).expect_err("unknown");

        assert!(error.to_string().contains("unknown scenario \"envoy\""));
    }

    #[test]
    fn tokengate_names_carry_alg_and_mix() {
        let scenario = Scenario::Tokengate {
            alg: "EdDSA",
            mix: Mix::Miss,
        };

        assert_eq!(scenario.name(), "tokengate-eddsa-miss");
    }
}
