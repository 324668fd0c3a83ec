//! Schema of a workload's authorization rules, token forwarding and
//! identity headers.
//!
//! Only the shape and the defaults live here; `validate` checks the
//! values and `policy` compiles them.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Forwarding of the verified token to the service, per workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardMode {
    /// The token stays where the caller put it. The default, because a
    /// service may verify the token again or pass it on to other services.
    #[default]
    Original,
    /// A token from a cookie is removed from the `Cookie` header and sent as
    /// `Authorization: Bearer`, the form most service frameworks read. A
    /// token from a header is forwarded as it came.
    CookieToAuthorization,
    /// The header or cookie that carried the token is removed.
    Strip,
}

/// Handling of CORS preflight requests, per workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorsPreflight {
    /// A preflight is decided by the rules like any other request. The
    /// default, because it opens nothing that the rules do not.
    #[default]
    Rules,
    /// `OPTIONS` with `Origin` and `Access-Control-Request-Method` goes to
    /// the service without a token: browsers never attach credentials to a
    /// preflight (Fetch standard, CORS-preflight request), so a rule that
    /// needs a token would reject every one.
    Pass,
}

/// One verified claim copied into a request header for the service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimHeader {
    /// Claim name, or a dotted path into nested objects.
    pub claim: String,
    /// Request header that receives the value. Every incoming header of
    /// this name is removed first, so a caller cannot set it.
    pub header: String,
}

/// One authorization rule: which requests it matches and what it requires.
///
/// Exactly one of `path`, `path_prefix` and `path_template` is set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Matches exactly this normalised path (a trailing `/` aside).
    #[serde(default)]
    pub path: Option<String>,
    /// Matches when the normalised request path starts with this prefix at a
    /// segment boundary (`/orders` matches `/orders` and `/orders/7`, not
    /// `/ordersX`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Matches segment by segment: a literal, `{name}` (one segment, named
    /// for `segment_equals_claim`), `*` (one segment) or, last only, `**`
    /// (any number of remaining segments, also none).
    #[serde(default)]
    pub path_template: Option<String>,
    /// Matching methods; any method when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Claim path to accepted values; each listed claim must equal one of
    /// its values (for an array claim, contain one of them). Values are
    /// compared as text, so `"3"` matches the number 3.
    #[serde(default)]
    pub claims: BTreeMap<String, Vec<String>>,
    /// The caller must hold at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The caller must hold every one of these scopes (`scope` or `scp`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Further requirements, combined with `all` and `any`.
    #[serde(default)]
    pub requires: Option<Requirement>,
    /// No token is needed and none is checked; the token sources are
    /// removed before forwarding and no identity headers are added.
    #[serde(default)]
    pub public: bool,
    /// A request without a token goes on as anonymous, without identity
    /// headers. A token that is present must be valid.
    #[serde(default)]
    pub allow_missing: bool,
    /// Like `allow_missing`, and a token that fails verification is removed
    /// and the request goes on as anonymous too.
    #[serde(default)]
    pub allow_missing_or_failed: bool,
}

/// A requirement tree with the power of Envoy's `requires_all` and
/// `requires_any`. Written as a one-key mapping, such as
/// `{all: [...]}` or `{roles_any: [admin]}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RequirementFields")]
pub enum Requirement {
    /// Every listed requirement holds.
    All(Vec<Requirement>),
    /// At least one listed requirement holds.
    Any(Vec<Requirement>),
    /// One claim compared by its JSON type.
    Claim(ClaimRequirement),
    /// At least one of these roles is held.
    RolesAny(Vec<String>),
    /// Every one of these roles is held.
    RolesAll(Vec<String>),
    /// At least one of these scopes is held.
    ScopesAny(Vec<String>),
    /// Every one of these scopes is held.
    ScopesAll(Vec<String>),
    /// A named segment of the rule's `path_template` equals a claim.
    SegmentEqualsClaim(SegmentClaim),
}

/// The mapping form of a [`Requirement`]. `serde_yaml` 0.9 reads enums only
/// from YAML tags (`!all`), so the one-key mapping is read through this.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequirementFields {
    #[serde(default)]
    all: Option<Vec<Requirement>>,
    #[serde(default)]
    any: Option<Vec<Requirement>>,
    #[serde(default)]
    claim: Option<ClaimRequirement>,
    #[serde(default)]
    roles_any: Option<Vec<String>>,
    #[serde(default)]
    roles_all: Option<Vec<String>>,
    #[serde(default)]
    scopes_any: Option<Vec<String>>,
    #[serde(default)]
    scopes_all: Option<Vec<String>>,
    #[serde(default)]
    segment_equals_claim: Option<SegmentClaim>,
}

impl TryFrom<RequirementFields> for Requirement {
    type Error = String;

    fn try_from(fields: RequirementFields) -> Result<Self, Self::Error> {
        let RequirementFields {
            all,
            any,
            claim,
            roles_any,
            roles_all,
            scopes_any,
            scopes_all,
            segment_equals_claim,
        } = fields;
        let variants = [
            all.map(Self::All),
            any.map(Self::Any),
            claim.map(Self::Claim),
            roles_any.map(Self::RolesAny),
            roles_all.map(Self::RolesAll),
            scopes_any.map(Self::ScopesAny),
            scopes_all.map(Self::ScopesAll),
            segment_equals_claim.map(Self::SegmentEqualsClaim),
        ];
        let mut set = variants.into_iter().flatten();
        match (set.next(), set.next()) {
            (Some(requirement), None) => Ok(requirement),
            _ => Err(REQUIREMENT_KEYS_MESSAGE.to_owned()),
        }
    }
}

const REQUIREMENT_KEYS_MESSAGE: &str =
    "a requirement is a mapping with exactly one key out of all, any, claim, \
     roles_any, roles_all, scopes_any, scopes_all and segment_equals_claim; \
     wrap several in `all` or `any`";

/// A comparison of one claim. Exactly one of `equals`, `one_of` and
/// `contains` is set. Values keep their YAML type: `true` matches the JSON
/// boolean, not the string `"true"`, and `3` matches 3 and 3.0.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequirement {
    /// Claim name, or a dotted path into nested objects.
    pub path: String,
    /// The claim equals this value.
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    /// The claim equals one of these values.
    #[serde(default)]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The claim is an array with an element equal to this value, or a
    /// string whose space-separated words include it.
    #[serde(default)]
    pub contains: Option<serde_json::Value>,
}

/// Binds a path segment to a claim, against enumeration of other callers'
/// resources.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentClaim {
    /// Name of a `{name}` segment of the rule's `path_template`.
    pub segment: String,
    /// Claim name, or a dotted path, whose string or integer value the
    /// percent-decoded segment must equal.
    pub claim: String,
}
