//! The egress object's maps as user space writes and reads them.

use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::Ebpf;
use tokengate_common::egress::{
    Dest4, Dest6, FlowKey, Origin, Pod, Settings, DEST_PREFIX_BITS, LAYOUT_VERSION, MAP_DEST4,
    MAP_DEST6, MAP_FLOWS, MAP_PODS, MAP_SETTINGS,
};

use super::EgressError;
use crate::config::{EgressConfig, EgressPodConfig};

/// The maps user space writes, taken out of the loaded object.
pub(super) struct EgressMaps {
    settings: Array<MapData, Settings>,
    pods: BpfHashMap<MapData, u64, Pod>,
    dest4: LpmTrie<MapData, Dest4, u8>,
    dest6: LpmTrie<MapData, Dest6, u8>,
    flows: Arc<Mutex<BpfHashMap<MapData, FlowKey, Origin>>>,
}

impl EgressMaps {
    /// Takes the maps out of `ebpf`; the counters and the pending map stay
    /// for the metrics.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EgressError> {
        Ok(Self {
            settings: take(ebpf, MAP_SETTINGS)?,
            pods: take(ebpf, MAP_PODS)?,
            dest4: take(ebpf, MAP_DEST4)?,
            dest6: take(ebpf, MAP_DEST6)?,
            flows: Arc::new(Mutex::new(take(ebpf, MAP_FLOWS)?)),
        })
    }

    /// Returns the flow map, shared by every pod's accept loops.
    pub(super) fn flows(&self) -> Arc<Mutex<BpfHashMap<MapData, FlowKey, Origin>>> {
        Arc::clone(&self.flows)
    }

    pub(super) fn write_settings(
        &mut self,
        agent_mark: u32,
        agent_cgroup_id: u64,
    ) -> Result<(), EgressError> {
        let settings = Settings {
            version: LAYOUT_VERSION,
            agent_mark,
            agent_cgroup_id,
        };
        self.settings
            .set(0, settings, 0)
            .map_err(|source| map_error(MAP_SETTINGS, source))
    }

    /// Enters the pod's destinations, then the pod itself, so the programs
    /// never see an enrolled pod without its destinations.
    pub(super) fn write_pod(
        &mut self,
        netns_cookie: u64,
        record: Pod,
        pod: &EgressPodConfig,
    ) -> Result<(), EgressError> {
        let (keys4, keys6) = destination_keys(netns_cookie, pod);
        for key in keys4 {
            self.dest4
                .insert(&key, 1, 0)
                .map_err(|source| map_error(MAP_DEST4, source))?;
        }
        for key in keys6 {
            self.dest6
                .insert(&key, 1, 0)
                .map_err(|source| map_error(MAP_DEST6, source))?;
        }
        self.pods
            .insert(netns_cookie, record, 0)
            .map_err(|source| map_error(MAP_PODS, source))
    }

    /// Removes the pods and destinations an earlier agent entered that the
    /// configuration in force no longer has. `cookies` are the namespace
    /// cookies of the configured pods, in configuration order.
    pub(super) fn remove_stale(
        &mut self,
        egress: &EgressConfig,
        cookies: &[u64],
    ) -> Result<(), EgressError> {
        let stale_pods: Vec<u64> = self
            .pods
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !cookies.contains(cookie))
            .collect();
        for cookie in stale_pods {
            self.pods
                .remove(&cookie)
                .map_err(|source| map_error(MAP_PODS, source))?;
        }

        let mut wanted4 = Vec::new();
        let mut wanted6 = Vec::new();
        for (pod, cookie) in egress.pods.iter().zip(cookies) {
            let (keys4, keys6) = destination_keys(*cookie, pod);
            wanted4.extend(keys4.iter().map(|key| (key.prefix_len(), key.data())));
            wanted6.extend(keys6.iter().map(|key| (key.prefix_len(), key.data())));
        }
        let stale4: Vec<Key<Dest4>> = self
            .dest4
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted4.contains(&(key.prefix_len(), key.data())))
            .collect();
        for key in stale4 {
            self.dest4
                .remove(&key)
                .map_err(|source| map_error(MAP_DEST4, source))?;
        }
        let stale6: Vec<Key<Dest6>> = self
            .dest6
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted6.contains(&(key.prefix_len(), key.data())))
            .collect();
        for key in stale6 {
            self.dest6
                .remove(&key)
                .map_err(|source| map_error(MAP_DEST6, source))?;
        }
        Ok(())
    }
}

/// Builds the LPM keys of a pod's destinations: one per prefix and port.
fn destination_keys(
    netns_cookie: u64,
    pod: &EgressPodConfig,
) -> (Vec<Key<Dest4>>, Vec<Key<Dest6>>) {
    let mut keys4 = Vec::new();
    let mut keys6 = Vec::new();
    for destination in &pod.destinations {
        let cidr = destination.cidr;
        let bits = DEST_PREFIX_BITS + u32::from(cidr.prefix_len);
        for port in &destination.ports {
            match cidr.masked() {
                std::net::IpAddr::V4(addr) => {
                    keys4.push(Key::new(
                        bits,
                        Dest4::new(netns_cookie, *port, addr.octets()),
                    ));
                }
                std::net::IpAddr::V6(addr) => {
                    keys6.push(Key::new(
                        bits,
                        Dest6::new(netns_cookie, *port, addr.octets()),
                    ));
                }
            }
        }
    }
    (keys4, keys6)
}

/// Takes map `name` out of `ebpf` as the typed map `T`.
pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EgressError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EgressError::MissingObject { kind: "map", name })?;
    T::try_from(map).map_err(|source| map_error(name, source))
}

pub(super) fn map_error(map: &'static str, source: aya::maps::MapError) -> EgressError {
    EgressError::Map { map, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_per_prefix_and_port() {
        let pod: EgressPodConfig = serde_yaml::from_str(
            "name: client\nnetns: /n\ncgroup: /c\ndestinations:\n  - cidr: 198.18.0.0/24\n    ports: [80, 443]\n  - cidr: fd00::/8\n    ports: [80]\n",
        )
        .unwrap();

        let (keys4, keys6) = destination_keys(5, &pod);

        assert_eq!(keys4.len(), 2);
        assert_eq!(keys6.len(), 1);
        assert_eq!(keys4[0].prefix_len(), DEST_PREFIX_BITS + 24);
        assert_eq!(keys4[1].data(), Dest4::new(5, 443, [198, 18, 0, 0]));
        assert_eq!(keys6[0].prefix_len(), DEST_PREFIX_BITS + 8);
    }
}
