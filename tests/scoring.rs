//! Scorers are streaming-honest and survive checkpoints: on a NAB series (kept in
//! `tests/data/nab`, MIT licence, see its README), for every model,
//! - scoring a prefix gives exactly the scores the whole series gives on that prefix;
//! - saving the state mid-series (postcard, as partition checkpoints do) and restoring
//!   it gives the same scores as the uninterrupted run.

use std::path::PathBuf;

use tidemark::config::{Config, ConfigSources};
use tidemark::score_csv::{Row, read_series, score_series, window_of};
use tidemark::scoring::{MODELS, Scorer, ScorerState, Scoring};

fn series(rows: usize) -> Vec<Row> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nab/realKnownCause/machine_temperature_system_failure.csv");
    let rows_read =
        read_series(&path).unwrap_or_else(|error| panic!("{error}: {} is part of the repository", path.display()));
    assert!(rows_read.len() > rows, "{} rows", rows_read.len());
    rows_read.into_iter().take(rows).collect()
}

fn scorer(model: &str) -> Scorer {
    let config = Config::load(&ConfigSources::default()).expect("defaults");
    Scorer::from_name(model, &config.scoring).expect("model")
}

#[test]
fn a_prefix_scores_the_same_as_the_whole_series_on_that_prefix() {
    let rows = series(3_000);
    for model in MODELS {
        let scorer = scorer(model);
        let whole = score_series(&scorer, &rows);
        for cut in [1, 250, 1_234, 2_999] {
            let prefix = score_series(&scorer, &rows[..cut]);
            assert_eq!(prefix, whole[..cut], "{model}: scores of the first {cut} rows depend on later rows");
        }
        let alerts = whole.iter().filter(|s| s.value >= 0.8).count();
        assert!(alerts < rows.len() / 10, "{model}: {alerts} scores ≥ 0.8 in {} rows", rows.len());
        assert!(whole.iter().all(|s| (0.0..=1.0).contains(&s.value) && !s.explanation.is_empty()));
    }
}

#[test]
fn a_checkpointed_and_restored_state_scores_like_an_uninterrupted_run() {
    let rows = series(2_000);
    for model in MODELS {
        let scorer = scorer(model);
        let whole = score_series(&scorer, &rows);
        for cut in [700, 1_500] {
            let mut state = scorer.new_state();
            let mut scores: Vec<_> = rows[..cut].iter().map(|&row| scorer.score(&mut state, &window_of(row))).collect();
            let saved = postcard::to_allocvec(&state).expect("serialise");
            drop(state);
            let mut restored: ScorerState = postcard::from_bytes(&saved).expect("deserialise");
            scores.extend(rows[cut..].iter().map(|&row| scorer.score(&mut restored, &window_of(row))));
            assert_eq!(scores, whole, "{model}: restoring at row {cut} changed the scores");
        }
    }
}

#[test]
fn event_types_can_use_their_own_model() {
    let config = Config::load(
        &ConfigSources::default().with("scoring.model", "ewma").with("scoring.event_types.vibration", "rcf"),
    )
    .expect("config");
    let scoring = Scoring::from_config(&config.scoring);
    assert_eq!(scoring.scorer("temperature").name(), "ewma");
    assert_eq!(scoring.scorer("vibration").name(), "rcf");

    let errors = Config::load(&ConfigSources::default().with("scoring.event_types.vibration", "lstm"))
        .expect_err("unknown model");
    assert!(
        errors.to_string().contains(
            "scoring.event_types.vibration (TIDEMARK__SCORING__EVENT_TYPES__VIBRATION) = \"lstm\": unknown model \"lstm\""
        ),
        "{errors}"
    );
}

#[test]
fn a_state_of_another_model_is_replaced_not_misread() {
    let rows = series(400);
    let ewma = scorer("ewma");
    let context = scorer("context");
    let mut state = ewma.new_state();
    for &row in &rows {
        ewma.score(&mut state, &window_of(row));
    }
    // The configuration switched the model: the key starts over with the new model.
    let score = context.score(&mut state, &window_of(rows[0]));
    let mut fresh = context.new_state();
    let expected = context.score(&mut fresh, &window_of(rows[0]));
    assert_eq!((state, score), (fresh, expected));
}
