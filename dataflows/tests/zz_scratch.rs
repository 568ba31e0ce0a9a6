use fmsflow_dataflows::*;
fn v(p: &str) -> String {
    let r = RawRecord {
        payload: p.as_bytes().to_vec(),
        ingest_ms: None,
        pos: SourcePos::default(),
    };
    match validate(r, &RuleConfig::default()) {
        Ok(r) => format!("OK {:?}", (r.device, r.time_ms, r.metrics)),
        Err(e) => format!("ERR {:?} {}", e.rule, e.reason),
    }
}
#[test]
fn explore() {
    let good = r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#;
    for p in [good,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":1e999,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":-1e999,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":1e-999,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1e999,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"extra":1e999,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":NaN,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":"1","sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1.0,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":99999999999999999999,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"["2025-07-07T08:21:29Z",1,1,2,3,4,5,6,false]"#,
      r#"[null,null,null,null,null,null,null,null,null]"#,
      r#"[1e999]"#, r#"1e999"#, r#"[1]"#, r#"null"#, r#""x""#, "", "   ", r#"{"#,
      r#"{"time":"2025-07-07T08:21:29Z","time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
      r#"{"time":"2025-07-07T08:21:29Z","DeviceId":1,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false} x"#,
      "{\"time\":\"2025-07-07T08:21:29Z\",\"DeviceId\":1,\"sensor1\":1,\"sensor2\":2,\"sensor3\":3,\"motor1\":4,\"motor2\":5,\"motor3\":6,\"isFail\":false}\n",
      r#"{"time":"2025-07-07T08:21:29\u005a","DeviceId":1,"sensor1":1,"sensor2":2,"sensor3":3,"motor1":4,"motor2":5,"motor3":6,"isFail":false}"#,
    ] { println!("{:.60} => {}", p, v(p)); }
    let mut b = good.as_bytes().to_vec();
    b[10] = 0xff;
    let r = RawRecord {
        payload: b,
        ingest_ms: None,
        pos: SourcePos::default(),
    };
    println!(
        "{:?}",
        validate(r, &RuleConfig::default())
            .err()
            .map(|e| (e.rule, e.reason))
    );
}
