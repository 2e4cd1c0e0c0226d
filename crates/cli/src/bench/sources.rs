//! Source addresses for many simulated nodes (one 127.x address per 2,000 connections).

use super::*;

/// Waves of source addresses at most: the wave is the third octet of
/// `127.<SUBNET_SOURCES>.<wave>.<n>`.
const WAVES_MAX: u8 = 255;
/// Source addresses of one wave at most: the last octet, below the
/// broadcast-like top of the range.
const SOURCES_PER_WAVE_MAX: usize = 250;

/// Source addresses for waves of simulated nodes.
#[derive(Default)]
pub(super) struct Sources {
    pub(super) wave: u8,
}

impl Sources {
    pub(super) fn next_wave(&mut self, nodes: usize) -> anyhow::Result<Vec<Ipv4Addr>> {
        self.wave = self
            .wave
            .checked_add(1)
            .filter(|w| *w < WAVES_MAX)
            .context("out of source-address waves (lower --runs)")?;
        let n = nodes.div_ceil(NODES_PER_SOURCE).max(1);
        ensure!(
            n < SOURCES_PER_WAVE_MAX,
            "too many simulated nodes for one wave"
        );
        Ok((0..n)
            .map(|i| Ipv4Addr::new(127, SUBNET_SOURCES, self.wave, 1 + i as u8))
            .collect())
    }
}

pub(super) fn source_of(sources: &[Ipv4Addr], k: usize) -> Ipv4Addr {
    sources[(k / NODES_PER_SOURCE).min(sources.len() - 1)]
}
