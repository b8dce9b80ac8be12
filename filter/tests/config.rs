//! Configuration parsing: what is accepted, and that every refusal names the
//! JSON path and the reason in one line.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::config::{Config, HostPattern, RuleAction, RuleMatch, Side, StickyKey, ValueTest};
use sluice::device::DeviceClass;
use sluice::retry::RetryMode;

const EXAMPLE: &str = r#"{
  "steering_header": "x-sluice-cluster",
  "services": [{
    "name": "shop",
    "match": {"authority": "shop.local", "path_prefix": "/"},
    "stable": "shop_v1",
    "canary": "shop_v2",
    "weight": 10,
    "sticky": {"header": "x-user-id"},
    "rules": [
      {"header": "x-canary", "equals": "always", "to": "canary"},
      {"header": "x-canary", "equals": "never", "to": "stable"},
      {"cookie": "beta", "equals": "yes", "to": "canary"},
      {"device": "mobile", "weight": 50}
    ]
  }]
}"#;

fn refused(json: &str) -> String {
    match Config::parse(json.as_bytes()) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(err) => err.to_string(),
    }
}

fn with_service(fields: &str) -> String {
    format!(r#"{{"services": [{{"name": "shop", "stable": "v1", "canary": "v2"{fields}}}]}}"#)
}

#[test]
fn the_documented_example_parses_to_what_it_says() {
    let config = Config::parse(EXAMPLE.as_bytes()).unwrap();
    assert_eq!(config.steering_header, "x-sluice-cluster");
    let shop = &config.services[0];
    assert_eq!(shop.name, "shop");
    assert_eq!(
        shop.matcher.authorities,
        vec![HostPattern::Exact("shop.local".into())]
    );
    assert_eq!(shop.matcher.path_prefix.as_deref(), Some("/"));
    assert_eq!(
        (shop.stable.as_str(), shop.canary.as_deref()),
        ("shop_v1", Some("shop_v2"))
    );
    assert_eq!(shop.weight_bp, 1000);
    assert_eq!(shop.sticky, Some(StickyKey::Header("x-user-id".into())));
    assert_eq!(shop.rules.len(), 4);
    assert_eq!(
        shop.rules[0].matcher,
        RuleMatch::Header {
            name: "x-canary".into(),
            test: ValueTest::Equals(vec![b"always".to_vec()])
        }
    );
    assert_eq!(shop.rules[1].action, RuleAction::To(Side::Stable));
    assert_eq!(
        shop.rules[2].matcher,
        RuleMatch::Cookie {
            name: "beta".into(),
            test: ValueTest::Equals(vec![b"yes".to_vec()])
        }
    );
    assert_eq!(
        shop.rules[3].matcher,
        RuleMatch::Device(DeviceClass::Mobile)
    );
    assert_eq!(shop.rules[3].action, RuleAction::Weight(5000));
}

#[test]
fn defaults_apply_when_keys_are_left_out() {
    let config = Config::parse(br#"{"services": [{"name": "a", "stable": "a_v1"}]}"#).unwrap();
    assert_eq!(config.steering_header, "x-sluice-cluster");
    let service = &config.services[0];
    assert_eq!(service.canary, None);
    assert_eq!(service.weight_bp, 0);
    assert!(service.matcher.authorities.is_empty());
    assert!(service.rules.is_empty());
}

#[test]
fn weights_keep_a_hundredth_of_a_percent() {
    let config = Config::parse(with_service(r#", "weight": 12.34"#).as_bytes()).unwrap();
    assert_eq!(config.services[0].weight_bp, 1234);
    let config = Config::parse(with_service(r#", "weight": 0.01"#).as_bytes()).unwrap();
    assert_eq!(config.services[0].weight_bp, 1);
    assert_eq!(
        refused(&with_service(r#", "weight": 12.345"#)),
        "services[0].weight: resolution is 0.01 percent, got 12.345"
    );
    let weight = |text: &str| {
        Config::parse(with_service(&format!(r#", "weight": {text}"#)).as_bytes())
            .map(|config| config.services[0].weight_bp)
            .map_err(|err| err.to_string())
    };
    // Read as decimals: at the resolution, and with exponents.
    assert_eq!(weight("99.99"), Ok(9999));
    assert_eq!(weight("100"), Ok(10_000));
    assert_eq!(weight("100.00"), Ok(10_000));
    assert_eq!(weight("0"), Ok(0));
    assert_eq!(weight("-0"), Ok(0));
    assert_eq!(weight("1.25e1"), Ok(1250));
    assert_eq!(weight("1E2"), Ok(10_000));
    assert_eq!(weight("5000e-2"), Ok(5000));
    assert_eq!(weight("0.29"), Ok(29));
    assert_eq!(weight("12.5"), Ok(1250));
    // Float noise from a generator is rounded away, as it always was.
    assert_eq!(weight("30.000000000000004"), Ok(3000));
    assert_eq!(weight("12.339999999999998"), Ok(1234));
    assert_eq!(weight("0.07000000000000001"), Ok(7));
    assert_eq!(weight("99.99999999999999"), Ok(10_000));
    // More than that is a resolution the weights do not have. The value is
    // shown as the number it is (`1e-3` is 0.001).
    for (finer, shown) in [
        ("0.001", "0.001"),
        ("12.3401", "12.3401"),
        ("12.34000002", "12.34000002"),
        ("33.333333333", "33.333333333"),
        ("1e-3", "0.001"),
    ] {
        assert_eq!(
            weight(finer),
            Err(format!(
                "services[0].weight: resolution is 0.01 percent, got {shown}"
            ))
        );
    }
    for (outside, shown) in [
        ("100.01", "100.01"),
        ("100.0000000000001", "100.0000000000001"),
        ("-0.01", "-0.01"),
        ("1e3", "1000"),
        ("1e300", "1e300"),
        ("-1e-300", "-1e-300"),
    ] {
        assert_eq!(
            weight(outside),
            Err(format!(
                "services[0].weight: must be between 0 and 100, got {shown}"
            ))
        );
    }
    // Valid JSON, but past what a double holds.
    assert_eq!(
        weight("1e400"),
        Err("services[0].weight: number out of range (beyond what a double holds)".into())
    );
}

#[test]
fn a_key_given_twice_is_refused_with_its_path() {
    assert_eq!(
        refused(&with_service(r#", "weight": 10, "weight": 20"#)),
        "services[0].weight: duplicate key"
    );
    assert_eq!(
        refused(r#"{"services": [{"name": "a", "stable": "v1"}], "services": []}"#),
        "services: duplicate key"
    );
    assert_eq!(
        refused(&with_service(
            r#", "retry": {"budget": {"ratio": 0.1, "ratio": 0.2}}"#
        )),
        "services[0].retry.budget.ratio: duplicate key"
    );
    assert_eq!(
        refused(&with_service(
            r#", "rules": [{"header": "x", "equals": "a", "to": "canary", "header": "y"}]"#
        )),
        "services[0].rules[0].header: duplicate key"
    );
}

#[test]
fn syntax_errors_name_the_line_and_column() {
    assert_eq!(
        refused("{\n  \"services\": [\n    {\"name\": \"a\", \"stable\": \"v1\",}\n  ]\n}"),
        "invalid JSON at line 3 column 34: trailing comma"
    );
    assert_eq!(
        refused(r#"{"services": []} trailing"#),
        "invalid JSON at line 1 column 18: trailing characters"
    );
    assert_eq!(
        refused("{\"services\": [{\"name\": \"a\", \"stable\": tru}]}"),
        "invalid JSON at line 1 column 42: expected true, false or null"
    );
    assert_eq!(
        refused(r#"{"services": [{"name": "a", "stable": "v1"}"#),
        "invalid JSON at line 1 column 43: EOF while parsing a list"
    );
    assert_eq!(
        refused("{\"services\": [{\"name\": \"a\", \"stable\": \"v\u{1}\"}]}"),
        "invalid JSON at line 1 column 41: control character (\\u0000-\\u001F) found while parsing a string"
    );
}

#[test]
fn deep_nesting_is_refused_at_the_first_wrong_level() {
    // Nesting only goes as deep as the config's own shape: a list where a
    // service belongs is refused there, however deep it goes on (no
    // recursion, no stack to overflow).
    for depth in [100, 1_000_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(
            refused(&format!(r#"{{"services": {deep}}}"#)),
            "services[0]: must be an object, got a list"
        );
    }
    assert_eq!(
        refused(&"[".repeat(1_000_000)),
        "must be an object, got a list"
    );
    assert_eq!(
        refused(&format!(r#"{{"x": {}}}"#, "{\"a\": ".repeat(200_000))),
        "x: unknown key (expected one of: steering_header, services)"
    );
}

#[test]
fn authorities_are_lower_cased_and_may_be_lists_and_wildcards() {
    let config = Config::parse(
        with_service(r#", "match": {"authority": ["Shop.Local", "*.Example.com", "*"]}"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        config.services[0].matcher.authorities,
        vec![
            HostPattern::Exact("shop.local".into()),
            HostPattern::Suffix(".example.com".into()),
            HostPattern::Any
        ]
    );
}

#[test]
fn each_refusal_names_the_path_and_the_reason() {
    let cases: &[(&str, &str)] = &[
        ("not json", "invalid JSON at line 1 column 2: expected true, false or null"),
        ("[]", "must be an object, got a list"),
        ("{}", "services: is required"),
        (r#"{"services": []}"#, "services: must list at least one service"),
        (r#"{"services": {}}"#, "services: must be a list, got an object"),
        (&with_service(r#", "weight": 150"#), "services[0].weight: must be between 0 and 100, got 150"),
        (&with_service(r#", "weight": -1"#), "services[0].weight: must be between 0 and 100, got -1"),
        (&with_service(r#", "weight": "10""#), "services[0].weight: must be a number, got a string"),
        (&with_service(r#", "weigth": 10"#), "services[0].weigth: unknown key (expected one of: name, match, stable, canary, stable_by_default, weight, sticky, rules, retry, breaker, rollout, failures, attempt_count_in_response)"),
        (r#"{"services": [{"stable": "v1"}]}"#, "services[0].name: is required"),
        (r#"{"services": [{"name": "a"}]}"#, "services[0].stable: is required"),
        (r#"{"services": [{"name": "", "stable": "v1"}]}"#, "services[0].name: must not be empty"),
        (r#"{"services": [{"name": "a.b", "stable": "v1"}]}"#, "services[0].name: \"a.b\" must be 1 to 64 letters, digits, '_' or '-' (it names metrics)"),
        (r#"{"services": [{"name": "a", "stable": "v1"}, {"name": "a", "stable": "v2"}]}"#, "services[1].name: duplicate service name \"a\""),
        (r#"{"services": [{"name": "a", "stable": "v1", "canary": "v1"}]}"#, "services[0].canary: must differ from stable"),
        (r#"{"services": [{"name": "a", "stable": "v1", "weight": 5}]}"#, "services[0].weight: needs a canary cluster to send traffic to"),
        (r#"{"services": [{"name": "a", "stable": "has space"}]}"#, "services[0].stable: \"has space\" is not a cluster name (visible ASCII, no spaces)"),
        (r#"{"steering_header": "", "services": [{"name": "a", "stable": "v1"}]}"#, "steering_header: must not be empty"),
        (r#"{"steering_header": "bad header", "services": [{"name": "a", "stable": "v1"}]}"#, "steering_header: \"bad header\" is not a valid header name"),
        (r#"{"steering_header": ":path", "services": [{"name": "a", "stable": "v1"}]}"#, "steering_header: must not be a pseudo-header"),
        (&with_service(r#", "match": {"authority": "shop.local:8080"}"#), "services[0].match.authority: \"shop.local:8080\" is not a host name (the port is ignored: name the host alone)"),
        (&with_service(r#", "match": {"authority": ["ok.local", "a*b.local"]}"#), "services[0].match.authority[1]: \"a*b.local\" is not a host name (a wildcard is allowed only as a leading \"*.\")"),
        (&with_service(r#", "match": {"authority": []}"#), "services[0].match.authority: must not be an empty list"),
        (&with_service(r#", "match": {"path_prefix": "api"}"#), "services[0].match.path_prefix: must start with \"/\", got \"api\""),
        (&with_service(r#", "match": {"host": "x"}"#), "services[0].match.host: unknown key (expected one of: authority, path_prefix)"),
        (&with_service(r#", "attempt_count_in_response": "true""#), "services[0].attempt_count_in_response: must be true or false, got a string"),
        (&with_service(r#", "attempt_count_in_response": null"#), "services[0].attempt_count_in_response: must be true or false, got null"),
        (&with_service(r#", "sticky": {}"#), "services[0].sticky: needs exactly one of \"header\" or \"cookie\""),
        (&with_service(r#", "sticky": {"header": ""}"#), "services[0].sticky.header: must not be empty"),
        (&with_service(r#", "rules": [{"header": "x", "to": "canary"}]"#), "services[0].rules[0]: needs exactly one test: \"equals\", \"prefix\", \"contains\" or \"present\""),
        (&with_service(r#", "rules": [{"header": "x", "equals": "a", "prefix": "b", "to": "canary"}]"#), "services[0].rules[0]: needs exactly one test: \"equals\", \"prefix\", \"contains\" or \"present\""),
        (&with_service(r#", "rules": [{"header": "x", "equals": "a"}]"#), "services[0].rules[0]: needs exactly one action: \"to\" or \"weight\""),
        (&with_service(r#", "rules": [{"header": "x", "equals": "a", "to": "blue"}]"#), "services[0].rules[0].to: must be \"canary\" or \"stable\", got \"blue\""),
        (&with_service(r#", "rules": [{"device": "phone", "to": "canary"}]"#), "services[0].rules[0].device: must be one of \"mobile\", \"tablet\", \"desktop\", \"bot\", got \"phone\""),
        (&with_service(r#", "rules": [{"device": "mobile", "weight": 101}]"#), "services[0].rules[0].weight: must be between 0 and 100, got 101"),
        (&with_service(r#", "rules": [{"cookie": "b", "equals": [], "to": "canary"}]"#), "services[0].rules[0].equals: must not be an empty list"),
        (&with_service(r#", "rules": [{"cookie": "b", "equals": ["x", 1], "to": "canary"}]"#), "services[0].rules[0].equals[1]: must be a string, got a number"),
        (&with_service(r#", "rules": [{"cookie": "b", "contains": "", "to": "canary"}]"#), "services[0].rules[0].contains: an empty string would match every value; use \"present\": true"),
        (&with_service(r#", "rules": [{"header": "x", "equals": "a", "to": "canary", "extra": 1}]"#), "services[0].rules[0].extra: unknown key (expected one of: header, cookie, device, equals, prefix, contains, present, to, weight)"),
        (&with_service(r#", "rules": [{"header": "x-sluice-cluster", "present": true, "to": "canary"}]"#), "services[0]: reads the steering header \"x-sluice-cluster\", which the filter removes from every request"),
        (r#"{"services": [{"name": "a", "stable": "v1", "rules": [{"header": "x", "equals": "1", "to": "canary"}]}]}"#, "services[0].rules[0].to: the service has no canary cluster"),
        (r#"{"services": [{"name": "a", "stable": "v1"}], "extra": true}"#, "extra: unknown key (expected one of: steering_header, services)"),
        (r#"{"services": [{"name": "a", "stable": "v1"}], "bad key\n": true}"#, "\"bad key\\n\": unknown key (expected one of: steering_header, services)"),
    ];
    for (json, expected) in cases {
        assert_eq!(&refused(json), expected, "for {json}");
        assert!(!refused(json).contains('\n'), "one line for {json}");
    }
}

#[test]
fn hostile_config_values_are_refused_with_a_bounded_message() {
    let long = "x".repeat(100_000);
    let message = refused(&with_service(&format!(r#", "weight": "{long}""#)));
    assert!(message.len() < 200, "{message}");
    let message = refused(&with_service(&format!(
        r#", "rules": [{{"device": "{long}", "to": "canary"}}]"#
    )));
    assert!(message.len() < 300, "{}", message.len());
    assert!(Config::parse(&[0xff, 0xfe]).is_err());
    assert!(Config::parse(b"").is_err());
}

#[test]
fn the_summary_names_every_service() {
    let config = Config::parse(EXAMPLE.as_bytes()).unwrap();
    assert_eq!(
        config.summary(),
        "1 services via header x-sluice-cluster: shop (stable=shop_v1 canary=shop_v2 weight=10%, 4 rules)"
    );
}

#[test]
fn huge_names_are_refused_with_a_bounded_message() {
    let long = "y".repeat(100_000);
    for json in [
        format!(
            r#"{{"steering_header": "{long} ", "services": [{{"name": "a", "stable": "v1"}}]}}"#
        ),
        format!(r#"{{"services": [{{"name": "{long}", "stable": "v1"}}]}}"#),
        format!(r#"{{"services": [{{"name": "a", "stable": "{long}"}}]}}"#),
        with_service(&format!(r#", "match": {{"authority": "{long}"}}"#)),
        with_service(&format!(r#", "sticky": {{"cookie": "{long}"}}"#)),
    ] {
        let message = refused(&json);
        assert!(message.len() < 300, "{}", &message[..300]);
    }
}

#[test]
fn rollout_excludes_a_fixed_weight_and_needs_a_canary() {
    let rollout = r#""rollout": {"steps": [5, 50, 100], "step_s": 60, "max_failure_rate": 0.02}"#;
    assert!(Config::parse(with_service(&format!(", {rollout}")).as_bytes()).is_ok());
    assert_eq!(
        refused(&with_service(&format!(r#", "weight": 5, {rollout}"#))),
        "services[0].rollout: a service has either \"weight\" or \"rollout\", not both"
    );
    assert_eq!(
        refused(&format!(
            r#"{{"services": [{{"name": "a", "stable": "v1", {rollout}}}]}}"#
        )),
        "services[0].rollout: needs a canary cluster to roll out"
    );
}

#[test]
fn nested_blocks_report_their_own_paths() {
    assert_eq!(
        refused(&with_service(r#", "retry": {"budget": {"ratio": 2}}"#)),
        "services[0].retry.budget.ratio: must be between 0 and 1, got 2"
    );
    assert!(
        refused(&with_service(r#", "retry": {"retry_on": "5xx,teapot"}"#))
            .starts_with("services[0].retry.retry_on: ")
    );
    assert!(refused(&with_service(
        r#", "breaker": {"open_ms": 10, "max_open_ms": 5}"#
    ))
    .starts_with("services[0].breaker.max_open_ms: "));
    assert!(refused(&with_service(r#", "breaker": {"typo": 1}"#))
        .starts_with("services[0].breaker.typo: unknown key"));
}

#[test]
fn whole_numbers_may_be_written_as_doubles() {
    // Config that went through a protobuf `Struct` (Istio) has only doubles:
    // `10.0` and `1e1` are the whole number 10.
    let config = Config::parse(
        with_service(
            r#", "retry": {"max_retries": 2.0, "timeout_ms": 5e3, "budget": {"min_per_s": 10.0, "window_s": 1E1}},
                "breaker": {"window_s": 10.0, "open_ms": 5000.0, "half_open_requests": 3.0},
                "rules": [{"header": "x", "present": true, "weight": 50.0}]"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let service = &config.services[0];
    let retry = service.retry.as_ref().unwrap();
    assert_eq!((retry.max_retries, retry.timeout_ms), (2, Some(5000)));
    assert_eq!((retry.budget.min_per_s, retry.budget.window_s), (10, 10));
    let breaker = service.breaker.as_ref().unwrap();
    assert_eq!(
        (
            breaker.window_ms,
            breaker.open_ms,
            breaker.half_open_requests
        ),
        (10_000, 5000, 3)
    );
    assert_eq!(service.rules[0].action, RuleAction::Weight(5000));
    // A fraction or a sign is not a whole number.
    for (value, shown) in [
        ("10.5", "10.5"),
        ("-1", "-1"),
        ("-1.0", "-1"),
        ("1e-7", "1e-7"),
    ] {
        assert_eq!(
            refused(&with_service(&format!(
                r#", "retry": {{"max_retries": {value}}}"#
            ))),
            format!(
                "services[0].retry.max_retries: must be a whole number between 0 and 10, got {shown}"
            )
        );
    }
    assert_eq!(
        refused(&with_service(r#", "retry": {"max_retries": 1e3}"#)),
        "services[0].retry.max_retries: must be between 0 and 10, got 1000"
    );
    assert_eq!(
        refused(&with_service(
            r#", "retry": {"max_retries": 18446744073709551616}"#
        )),
        "services[0].retry.max_retries: must be between 0 and 10, got 18446744073709552000"
    );
}

#[test]
fn null_is_a_wrong_type_not_an_absent_key() {
    let cases: &[(&str, &str)] = &[
        (
            r#", "weight": null"#,
            "services[0].weight: must be a number, got null",
        ),
        (
            r#", "sticky": null"#,
            "services[0].sticky: must be an object, got null",
        ),
        (
            r#", "rules": null"#,
            "services[0].rules: must be a list, got null",
        ),
        (
            r#", "match": {"authority": ["a.local", null]}"#,
            "services[0].match.authority[1]: must be a string, got null",
        ),
        (
            r#", "rules": [{"header": "x", "present": null, "to": "canary"}]"#,
            "services[0].rules[0].present: must be true or false, got null",
        ),
        (
            r#", "retry": {"max_retries": null}"#,
            "services[0].retry.max_retries: must be a whole number, got null",
        ),
    ];
    for (fields, expected) in cases {
        assert_eq!(&refused(&with_service(fields)), expected, "for {fields}");
    }
    assert_eq!(
        refused(r#"{"steering_header": null, "services": [{"name": "a", "stable": "v1"}]}"#),
        "steering_header: must be a string, got null"
    );
}

#[test]
fn a_device_rule_takes_no_value_test() {
    assert_eq!(
        refused(&with_service(
            r#", "rules": [{"device": "bot", "prefix": "x", "to": "stable"}]"#
        )),
        "services[0].rules[0].prefix: a \"device\" rule takes no test (the device class is the test)"
    );
}

#[test]
fn state_keys_do_not_depend_on_the_parser() {
    // Shared-data keys are fingerprints of the parsed blocks: a new parser
    // that read the same config differently would reset every breaker,
    // budget and rollout of a fleet on upgrade. Pinned from the previous one.
    let config = Config::parse(
        with_service(
            r#", "retry": {"budget": {"ratio": 0.25, "min_per_s": 3, "window_s": 20}},
                "breaker": {"window_s": 10, "min_requests": 20, "failure_rate": 0.5, "consecutive_failures": 5,
                            "slow_ms": 1000, "slow_rate": 0.8, "open_ms": 5000, "max_open_ms": 60000, "half_open_requests": 3},
                "rollout": {"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100,
                            "start_unix_s": 1795000000}"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let service = &config.services[0];
    assert_eq!(
        sluice::breaker::state_key("shop", "shop_v1", service.breaker.as_ref().unwrap()),
        "sluice/breaker/v2/shop/shop_v1/4db12eb074c22a53"
    );
    assert_eq!(
        sluice::breaker::state_key("shop", "shop_v1", &Default::default()),
        "sluice/breaker/v2/shop/shop_v1/ec230622d66766e2"
    );
    assert_eq!(
        sluice::rollout::state_key(
            "shop",
            "shop_v1",
            "shop_v2",
            service.rollout.as_ref().unwrap()
        ),
        "sluice/rollout/shop/441b5750345768e2"
    );
    assert_eq!(
        sluice::retry::budget_key("shop", service.retry.as_ref().unwrap()),
        "sluice/retry_budget/shop/502dae41db0ffd89"
    );
    assert_eq!(sluice::sticky::bucket(b"shop", b"alice"), 6746);
}

#[test]
fn retry_idempotent_is_validated_like_every_other_key() {
    let retry =
        |idempotent: &str| with_service(&format!(r#", "retry": {{"idempotent": {idempotent}}}"#));
    let many_methods = format!(
        "{{\"methods\": [{}]}}",
        (0..33)
            .map(|i| format!("\"M{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let many_prefixes = format!(
        "{{\"path_prefixes\": [{}]}}",
        (0..65)
            .map(|i| format!("\"/p{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let long_prefix = format!("{{\"path_prefixes\": [\"/{}\"]}}", "a".repeat(1024));
    let cases: Vec<(String, &str)> = vec![
        (retry(r#""POST""#), "services[0].retry.idempotent: must be an object, got a string"),
        (retry("null"), "services[0].retry.idempotent: must be an object, got null"),
        (retry(r#"{"verbs": ["POST"]}"#), "services[0].retry.idempotent.verbs: unknown key (expected one of: methods, path_prefixes)"),
        (retry(r#"{"methods": "POST"}"#), "services[0].retry.idempotent.methods: must be a list, got a string"),
        (retry(r#"{"methods": [1]}"#), "services[0].retry.idempotent.methods[0]: must be a string, got a number"),
        (retry(r#"{"methods": ["POST", ""]}"#), "services[0].retry.idempotent.methods[1]: \"\" is not an HTTP method (1 to 64 token characters, case-sensitive)"),
        (retry(r#"{"methods": ["PO ST"]}"#), "services[0].retry.idempotent.methods[0]: \"PO ST\" is not an HTTP method (1 to 64 token characters, case-sensitive)"),
        (retry(r#"{"methods": ["POST", "POST"]}"#), "services[0].retry.idempotent.methods[1]: lists \"POST\" twice"),
        (retry(&many_methods), "services[0].retry.idempotent.methods: too many methods (at most 32), got 33"),
        (retry(r#"{"path_prefixes": ["api"]}"#), "services[0].retry.idempotent.path_prefixes[0]: must start with \"/\", got \"api\""),
        (retry(r#"{"path_prefixes": [""]}"#), "services[0].retry.idempotent.path_prefixes[0]: must start with \"/\", got \"\""),
        (retry(r#"{"path_prefixes": ["/a b"]}"#), "services[0].retry.idempotent.path_prefixes[0]: \"/a b\" is not a path prefix (at most 1024 visible ASCII characters, no spaces)"),
        (retry(r#"{"path_prefixes": ["/a", "/a"]}"#), "services[0].retry.idempotent.path_prefixes[1]: lists \"/a\" twice"),
        (retry(r#"{"path_prefixes": null}"#), "services[0].retry.idempotent.path_prefixes: must be a list, got null"),
        (retry(&many_prefixes), "services[0].retry.idempotent.path_prefixes: too many path prefixes (at most 64), got 65"),
    ];
    for (json, expected) in &cases {
        assert_eq!(&refused(json), expected, "{json}");
    }
    assert!(refused(&retry(&long_prefix))
        .starts_with("services[0].retry.idempotent.path_prefixes[0]: \"/aaaa"));
    // Accepted: both keys optional, methods kept as written (case matters).
    let config = Config::parse(
        retry(r#"{"methods": ["POST", "post", "X-CUSTOM"], "path_prefixes": ["/", "/api/v1/"]}"#)
            .as_bytes(),
    )
    .unwrap();
    let policy = config.services[0].retry.clone().unwrap();
    assert_eq!(policy.idempotent.methods, ["POST", "post", "X-CUSTOM"]);
    assert_eq!(policy.idempotent.path_prefixes, ["/", "/api/v1/"]);
    let config = Config::parse(retry("{}").as_bytes()).unwrap();
    assert_eq!(
        config.services[0].retry.clone().unwrap().idempotent,
        Default::default()
    );
}

#[test]
fn retry_mode_and_stable_by_default_are_validated() {
    let retry = |block: &str| with_service(&format!(r#", "retry": {block}"#));
    #[rustfmt::skip]
    let cases: Vec<(String, &str)> = vec![
        (retry(r#"{"mode": "router"}"#), "services[0].retry.mode: must be \"headers\" or \"route\", got \"router\""),
        (retry(r#"{"mode": "Route", "max_retries": 1, "retry_on": "5xx"}"#), "services[0].retry.mode: must be \"headers\" or \"route\", got \"Route\""),
        (retry(r#"{"mode": 1}"#), "services[0].retry.mode: must be a string, got a number"),
        (retry(r#"{"mode": null}"#), "services[0].retry.mode: must be a string, got null"),
        // Route mode states the route's policy: no default may stand in.
        (retry(r#"{"mode": "route", "retry_on": "5xx"}"#), "services[0].retry.max_retries: is required in route mode (it states the route's retry_policy)"),
        (retry(r#"{"mode": "route", "max_retries": 2}"#), "services[0].retry.retry_on: is required in route mode (it states the route's retry_policy)"),
        (retry(r#"{"mood": "route"}"#), "services[0].retry.mood: unknown key (expected one of: mode, max_retries, retry_on, timeout_ms, per_try_timeout_ms, budget, deadline_header, idempotent)"),
        (with_service(r#", "stable_by_default": "true""#), "services[0].stable_by_default: must be true or false, got a string"),
        (with_service(r#", "stable_by_default": 1"#), "services[0].stable_by_default: must be true or false, got a number"),
        (with_service(r#", "stable_by_default": null"#), "services[0].stable_by_default: must be true or false, got null"),
    ];
    for (json, expected) in &cases {
        assert_eq!(&refused(json), expected, "{json}");
    }
    let parsed = |json: &str| Config::parse(json.as_bytes()).unwrap().services.remove(0);
    let service = parsed(&with_service(""));
    assert!(!service.stable_by_default);
    let service = parsed(&with_service(
        r#", "stable_by_default": true, "retry": {"mode": "route", "max_retries": 3, "retry_on": "5xx,reset", "timeout_ms": 2000}"#,
    ));
    assert!(service.stable_by_default);
    let policy = service.retry.unwrap();
    assert_eq!(policy.mode, RetryMode::Route);
    assert_eq!(
        (
            policy.max_retries,
            policy.retry_on.as_str(),
            policy.timeout_ms
        ),
        (3, "5xx,reset", Some(2000))
    );
    let policy = parsed(&retry(r#"{"mode": "headers"}"#)).retry.unwrap();
    assert_eq!(policy, parsed(&retry("{}")).retry.unwrap());
    assert_eq!(policy.mode, RetryMode::Headers);
}
