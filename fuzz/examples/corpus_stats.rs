//! Replays a lifecycle corpus natively and sums what the runs did:
//! `cargo run --example corpus_stats -- corpus/lifecycle`.
use arbitrary::Unstructured;
use sluice_fuzz::{decode, lifecycle::Sim};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/lifecycle".into());
    let mut total = sluice_fuzz::lifecycle::Stats::default();
    let (mut inputs, mut failures) = (0, 0);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(data) = std::fs::read(entry.path()) else {
            continue;
        };
        let mut u = Unstructured::new(&data);
        let Ok(scenario) = decode::scenario(&mut u) else {
            continue;
        };
        inputs += 1;
        match Sim::run(&scenario) {
            Ok(stats) => {
                if std::env::var_os("PER_FILE").is_some() {
                    println!(
                        "{} {} {} {} {} {} {} {}",
                        entry.path().display(),
                        stats.requests,
                        stats.denied,
                        stats.trips,
                        stats.half_opens,
                        stats.closes,
                        stats.rollbacks,
                        stats.rejected
                    );
                }
                total.requests += stats.requests;
                total.unmatched += stats.unmatched;
                total.canary += stats.canary;
                total.rejected += stats.rejected;
                total.granted += stats.granted;
                total.denied += stats.denied;
                total.trips += stats.trips;
                total.half_opens += stats.half_opens;
                total.closes += stats.closes;
                total.rollbacks += stats.rollbacks;
                total.budget_checks += stats.budget_checks;
                total.lost_updates += stats.lost_updates;
                total.leases += stats.leases;
            }
            Err(err) => {
                failures += 1;
                println!("{}: {err}", entry.path().display());
            }
        }
    }
    println!("{inputs} inputs, {failures} failing\n{total:#?}");
}
