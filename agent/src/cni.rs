//! The `tokengate-cni` chained CNI plugin and its protocol with the agent.
//!
//! The container runtime runs the plugin after the pod's network is set up
//! and before its containers start. The plugin hands the pod sandbox to the
//! agent over a Unix socket and exits only after the agent has replied,
//! so a selected pod's protected ports are steered before anything in the
//! pod can listen on them. The agent side is `enrollment`.

pub mod install;
pub mod plugin;
pub mod protocol;
