;; A tiny Proxy-Wasm 0.2.1 guest for the host's self-tests.
;;
;; The first byte of the plugin configuration selects a scenario (read in
;; proxy_on_configure). Results are reported through the host itself: status
;; codes are logged as "<tag>=<two digits>" at info, values are logged raw.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer_bytes (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment_metric (param i32 i64) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $mode (mut i32) (i32.const 0))
  (global $metric (mut i32) (i32.const 0))

  (data (i32.const 1024) "k")
  (data (i32.const 1032) "v1")
  (data (i32.const 1040) "v2")
  (data (i32.const 1048) "v3")
  (data (i32.const 1056) "v4")
  (data (i32.const 1064) "X-Added")
  (data (i32.const 1080) "x-replaced")
  (data (i32.const 1096) "x-removed")
  (data (i32.const 1112) "missing")
  (data (i32.const 1128) ":path")
  (data (i32.const 1136) "plugin_root_id")
  (data (i32.const 1152) "nope")
  (data (i32.const 1160) "about to trap")
  (data (i32.const 1176) "bad config: refused")
  (data (i32.const 1200) "denied by test")
  ;; serialized pairs [("x-why", "test")]
  (data (i32.const 1224) "\01\00\00\00\05\00\00\00\04\00\00\00x-why\00test\00")
  (data (i32.const 1256) "ticks")
  (data (i32.const 1264) "x-seen-by-filter")
  (data (i32.const 1288) "1")
  (data (i32.const 1290) "2")
  (data (i32.const 1292) "r")
  ;; iovec for fd_write: buf=1320 len=6, then "hello\n"
  (data (i32.const 1312) "\28\05\00\00\06\00\00\00")
  (data (i32.const 1320) "hello\n")

  ;; A bump allocator: enough for a test.
  (func $alloc (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (global.get $heap) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $p))

  (func (export "proxy_abi_version_0_2_1"))

  ;; Logs "<tag>=<status as two digits>" at info.
  (func $st (param $tag i32) (param $status i32)
    (i32.store8 (i32.const 512) (local.get $tag))
    (i32.store8 (i32.const 513) (i32.const 61))
    (i32.store8 (i32.const 514) (i32.add (i32.const 48) (i32.div_u (local.get $status) (i32.const 10))))
    (i32.store8 (i32.const 515) (i32.add (i32.const 48) (i32.rem_u (local.get $status) (i32.const 10))))
    (drop (call $log (i32.const 2) (i32.const 512) (i32.const 4))))

  ;; Logs the buffer the host returned at (608, 612).
  (func $log_ret
    (drop (call $log (i32.const 2) (i32.load (i32.const 608)) (i32.load (i32.const 612)))))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_configure") (param $ctx i32) (param $size i32) (result i32)
    (drop (call $get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $size) (i32.const 608) (i32.const 612)))
    (if (i32.eqz (local.get $size)) (then (return (i32.const 1))))
    (global.set $mode (i32.load8_u (i32.load (i32.const 608))))
    (if (i32.eq (global.get $mode) (i32.const 114)) ;; 'r'
      (then
        (drop (call $log (i32.const 3) (i32.const 1176) (i32.const 19)))
        (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 107)) ;; 'k'
      (then
        (drop (call $define_metric (i32.const 0) (i32.const 1256) (i32.const 5) (i32.const 620)))
        (global.set $metric (i32.load (i32.const 620)))
        ;; counters cannot be incremented by 0
        (call $st (i32.const 97) (call $increment_metric (global.get $metric) (i64.const 0)))
        (drop (call $set_tick (i32.const 1000)))))
    (i32.const 1))

  (func (export "proxy_on_tick") (param $ctx i32)
    (drop (call $increment_metric (global.get $metric) (i64.const 1)))
    (drop (call $now (i32.const 616)))
    (drop (call $fd_write (i32.const 1) (i32.const 1312) (i32.const 1) (i32.const 640))))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; 'c': shared data and CAS
    (if (i32.eq (global.get $mode) (i32.const 99))
      (then
        (call $st (i32.const 97) (call $get_shared (i32.const 1024) (i32.const 1) (i32.const 608) (i32.const 612) (i32.const 600)))
        (call $st (i32.const 98) (call $set_shared (i32.const 1024) (i32.const 1) (i32.const 1032) (i32.const 2) (i32.const 0)))
        (call $st (i32.const 99) (call $get_shared (i32.const 1024) (i32.const 1) (i32.const 608) (i32.const 612) (i32.const 600)))
        (call $st (i32.const 100) (call $set_shared (i32.const 1024) (i32.const 1) (i32.const 1040) (i32.const 2) (i32.load (i32.const 600))))
        ;; the CAS we hold is stale now
        (call $st (i32.const 101) (call $set_shared (i32.const 1024) (i32.const 1) (i32.const 1048) (i32.const 2) (i32.load (i32.const 600))))
        (call $st (i32.const 102) (call $set_shared (i32.const 1024) (i32.const 1) (i32.const 1056) (i32.const 2) (i32.const 0)))))
    ;; 'h': header maps
    (if (i32.eq (global.get $mode) (i32.const 104))
      (then
        (call $st (i32.const 97) (call $add_header (i32.const 0) (i32.const 1064) (i32.const 7) (i32.const 1288) (i32.const 1)))
        (drop (call $add_header (i32.const 0) (i32.const 1064) (i32.const 7) (i32.const 1290) (i32.const 1)))
        (call $st (i32.const 98) (call $replace_header (i32.const 0) (i32.const 1080) (i32.const 10) (i32.const 1292) (i32.const 1)))
        (call $st (i32.const 99) (call $remove_header (i32.const 0) (i32.const 1096) (i32.const 9)))
        (drop (call $get_header (i32.const 0) (i32.const 1064) (i32.const 7) (i32.const 608) (i32.const 612)))
        (call $log_ret)
        (call $st (i32.const 100) (call $get_header (i32.const 2) (i32.const 1128) (i32.const 5) (i32.const 608) (i32.const 612)))
        (call $st (i32.const 101) (call $get_header (i32.const 0) (i32.const 1112) (i32.const 7) (i32.const 608) (i32.const 612)))
        (call $st (i32.const 102) (call $get_header (i32.const 9) (i32.const 1112) (i32.const 7) (i32.const 608) (i32.const 612)))
        ;; pairs round trip: get then set back the same serialization
        (drop (call $get_pairs (i32.const 0) (i32.const 608) (i32.const 612)))
        (call $st (i32.const 103) (call $set_pairs (i32.const 0) (i32.load (i32.const 608)) (i32.load (i32.const 612))))))
    ;; 'm': memory validation and argument checks
    (if (i32.eq (global.get $mode) (i32.const 109))
      (then
        (call $st (i32.const 97) (call $log (i32.const 2) (i32.const -16) (i32.const 100)))
        (call $st (i32.const 98) (call $get_header (i32.const 0) (i32.const 1128) (i32.const 5) (i32.const -4) (i32.const 612)))
        (call $st (i32.const 99) (call $get_shared (i32.const 131070) (i32.const 10) (i32.const 608) (i32.const 612) (i32.const 600)))
        (call $st (i32.const 100) (call $log (i32.const 9) (i32.const 1152) (i32.const 4)))
        (drop (call $get_property (i32.const 1136) (i32.const 14) (i32.const 608) (i32.const 612)))
        (call $log_ret)
        (call $st (i32.const 101) (call $get_property (i32.const 1152) (i32.const 4) (i32.const 608) (i32.const 612)))
        (call $st (i32.const 102) (call $now (i32.const 131068)))))
    ;; 't': trap
    (if (i32.eq (global.get $mode) (i32.const 116))
      (then
        (drop (call $log (i32.const 5) (i32.const 1160) (i32.const 13)))
        (unreachable)))
    ;; 'l': local reply (returns Continue, which Envoy overrides)
    (if (i32.eq (global.get $mode) (i32.const 108))
      (then
        (call $st (i32.const 97)
          (call $local_response (i32.const 403) (i32.const 1200) (i32.const 14) (i32.const 1152) (i32.const 4)
                                (i32.const 1224) (i32.const 23) (i32.const -1)))))
    (i32.const 0))

  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    ;; request headers are gone once the request phase continued
    (call $st (i32.const 104) (call $get_header (i32.const 0) (i32.const 1128) (i32.const 5) (i32.const 608) (i32.const 612)))
    (drop (call $add_header (i32.const 2) (i32.const 1264) (i32.const 16) (i32.const 1288) (i32.const 1)))
    (i32.const 0))

  (func (export "proxy_on_log") (param $ctx i32)
    ;; ... but readable again in the access-log phase
    (drop (call $get_header (i32.const 0) (i32.const 1128) (i32.const 5) (i32.const 608) (i32.const 612)))
    (call $log_ret)
    ;; and not writable
    (call $st (i32.const 105) (call $add_header (i32.const 0) (i32.const 1064) (i32.const 7) (i32.const 1288) (i32.const 1))))

  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)
