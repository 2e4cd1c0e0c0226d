//! Runs many simulation seeds:
//! `cargo run -p handover-sim --release -- --seeds 10000 [--from N]`.
//!
//! Prints every failure (invariant, last events, how to replay it) and a
//! summary of the faults injected; exits 1 if any seed failed.

use handover_sim::{run, run_traced, SimConfig, Stats};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: handover-sim [--seeds N] [--from N] [--groups G] [--fault-ms MS] \
[--failing-switch-percent P] [--no-heal-stale-registration] [--trace] [--quiet]

  --seeds N                    seeds to run (default 1000)
  --from N                     first seed (default 0)
  --groups G                   at most G groups of a primary and a backup (default 3)
  --fault-ms MS                faults during the first MS of each run (default 120000)
  --failing-switch-percent P   share of seeds whose controller switch fails (default 10)
  --no-heal-stale-registration turn off the node's hello-again on a contradicting grant
  --trace                      print the whole trace of every failing seed
  --quiet                      no progress lines";

struct Args {
    seeds: u64,
    from: u64,
    config: SimConfig,
    /// The flags that changed `config`, for the replay line.
    config_flags: Vec<String>,
    trace: bool,
    quiet: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 1_000,
        from: 0,
        config: SimConfig::default(),
        config_flags: Vec::new(),
        trace: false,
        quiet: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--quiet" => {
                a.quiet = true;
                continue;
            }
            "--trace" => {
                a.trace = true;
                continue;
            }
            "--no-heal-stale-registration" => {
                a.config.heal_stale_registration = false;
                a.config_flags.push(flag);
                continue;
            }
            "--help" | "-h" => return Err(USAGE.into()),
            _ => {}
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = value
            .parse::<u64>()
            .map_err(|_| format!("{flag} takes a number, not {value:?}\n{USAGE}"))?;
        match flag.as_str() {
            "--seeds" => a.seeds = number,
            "--from" => a.from = number,
            "--groups" => a.config.groups_max = usize::try_from(number).unwrap_or(1).max(1),
            "--fault-ms" => a.config.fault_ms = number,
            "--failing-switch-percent" => {
                a.config.failing_switch_percent = u32::try_from(number.min(100)).unwrap_or(100)
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
        if flag != "--seeds" && flag != "--from" {
            a.config_flags.push(format!("{flag} {value}"));
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    let (mut events, mut records) = (0u64, 0u64);
    let (mut events_max, mut sim_ms_max) = ((0, 0), (0, 0));
    let mut totals = Stats::default();
    let mut outcomes = BTreeMap::<String, u64>::new();
    let last = a.from.saturating_add(a.seeds);
    for seed in a.from..last {
        match run(seed, &a.config) {
            Ok(r) => {
                events += r.events;
                records += r.records_produced;
                events_max = events_max.max((r.events, seed));
                sim_ms_max = sim_ms_max.max((r.sim_ms, seed));
                totals.add(&r.stats);
                let outcome = r.outcome.split(':').next().unwrap_or("").to_owned();
                *outcomes.entry(outcome).or_default() += 1;
            }
            Err(failure) => {
                println!(
                    "FAILED seed {} at {} ms: {}\n{}",
                    seed,
                    failure.at_ms,
                    failure.invariant,
                    failure.trace_tail_text()
                );
                if a.config_flags.is_empty() {
                    println!("replay with {}", failure.replay_command());
                }
                let flags: String = a.config_flags.iter().map(|f| format!(" {f}")).collect();
                println!(
                    "replay with cargo run -p handover-sim --release -- --from {seed} --seeds 1{flags} --trace\n"
                );
                if a.trace {
                    for line in run_traced(seed, &a.config).1 {
                        println!("{line}");
                    }
                }
                failed.push(seed);
            }
        }
        let done = seed - a.from + 1;
        if !a.quiet && done % 100 == 0 {
            eprintln!(
                "{done} seeds, {} failed, {:?}",
                failed.len(),
                started.elapsed()
            );
        }
    }
    println!(
        "{} seeds from {}: {} failed, {events} events, {records} records, {:?}",
        a.seeds,
        a.from,
        failed.len(),
        started.elapsed()
    );
    println!(
        "most events: {} (seed {}); longest run: {} ms simulated (seed {})",
        events_max.0, events_max.1, sim_ms_max.0, sim_ms_max.1
    );
    println!("outcomes: {outcomes:?}");
    println!("faults and refusals over all passing seeds: {totals:#?}");
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failing seeds: {failed:?}");
        ExitCode::FAILURE
    }
}
