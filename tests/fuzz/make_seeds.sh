#!/usr/bin/env bash
# Regenerates the committed seed corpora in tests/fuzz/corpus/<target>/ from
# tests/data/ and schemas/ (the regression cases in corpus/*/regress-* are
# kept: they are findings, not seeds).  Run it when the fixtures change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
C="$ROOT/tests/fuzz/corpus"
mkdir -p "$C"/{intake,provider,schema,parse,config,json_read}
find "$C" -type f -name 'seed-*' -delete

# intake: content type, headers, empty line, body
for f in "$ROOT"/tests/data/jobs/valid/*.json; do
  { printf 'application/json\n\n'; cat "$f"; } >"$C/intake/seed-valid-$(basename "$f" .json)"
done
for d in "$ROOT"/tests/data/jobs/invalid/*/; do
  { printf 'application/json\n\n'; cat "$d/input.json" 2>/dev/null || true; } >"$C/intake/seed-invalid-$(basename "$d")"
done
minimal="$ROOT/tests/data/jobs/valid/minimal.json"
{ printf -- '-\nx-attempts: 2\niw-target: ext-api.submit\n\n'; cat "$minimal"; } >"$C/intake/seed-headers"
{ printf 'text/plain; charset=\xe6\x97\n\n'; cat "$minimal"; } >"$C/intake/seed-content-type"
{ printf 'application/json; charset=utf-8\n\n'; cat "$minimal"; } >"$C/intake/seed-content-type-param"

# provider answers: "status transport", headers, empty line, body
p="$C/provider"
printf '201 0\n\n{"id":"e-1","status":"pending","message":"queued","trackingId":"t-1"}' >"$p/seed-201"
printf '200 0\n\n{"trackingId":"t-1","status":"completed","result":{"ok":true}}' >"$p/seed-status"
printf '200 0\n\n{"id":"r-1","ext_name":"n","ext_status":"ACTIVE","ext_data":{"field_one":"a","field_two":2}}' >"$p/seed-resource"
printf '429 0\nRetry-After: 2\n\n{}' >"$p/seed-429-delta"
printf '429 0\nRetry-After: Fri, 01 Jan 2100 00:00:00 GMT\n\n' >"$p/seed-429-date"
printf '429 0\nX-RateLimit-Reset-Ms: 9223372036854775807\n\n' >"$p/seed-429-reset-huge"
printf '503 0\nRetry-After: 5\n\n' >"$p/seed-503"
printf '404 0\n\n{"error":"not found"}' >"$p/seed-404"
printf '0 1\n\n' >"$p/seed-timeout"
printf '0 2\n\n' >"$p/seed-connect"

# schema: schema, "----" line, instance
for f in "$ROOT"/schemas/*.schema.json; do
  { cat "$f"; printf '\n----\n'; cat "$minimal"; } >"$C/schema/seed-$(basename "$f" .schema.json)"
done
printf '{"type":"array","items":{"$ref":"#"},"maxItems":2}\n----\n[[[[[]]]]]' >"$C/schema/seed-ref-recursion"
printf '{"minLength":2,"maxLength":3}\n----\n"\xe6\x97\xa5\xe6\x97\xa5"' >"$C/schema/seed-codepoints"
printf '{"multipleOf":0.01}\n----\n1e308' >"$C/schema/seed-multipleof"

# parse: one value each
i=0
for v in '50/min,1000/hour,20000/day' '20/10s' '0s,2s,4s,8s' '5s,10s,30s,1m,5m' '1500ms' '24h' '7d' \
  '0' '99999999999999999999d' '9223372036854775807ms' '5/fortnight' '1s,,' ' 1s , 2s '; do
  i=$((i + 1)); printf '%s' "$v" >"$C/parse/seed-$i"
done

# config: "=NAME=value" lines
c="$C/config"
printf '=IW_AMQP_URL=admin:S3cretPW@rabbit/\n' >"$c/seed-amqp-no-scheme"
printf '=IW_AMQP_URL=amqp://a:S3cretPW@127.0.0.1:5672/%%2f,amqps://a:b@h:5671/v\n' >"$c/seed-amqp-cluster"
printf '=IW_REDIS_URL=redis://:S3cretPW@127.0.0.1:6379/0\n' >"$c/seed-redis"
printf '=IW_PROVIDER_URL=http://u:S3cretPW@provider.example.com\n=IW_ALLOW_INSECURE_HTTP=1\n' >"$c/seed-insecure"
printf '=IW_NAMESPACE=amq.x\n' >"$c/seed-namespace"
printf '=IW_RATE_LIMITS=50/min,1000/hour\n=IW_RETRY_SCHEDULE=0s,1s\n=IW_AUTH_MODE=oauth2\n=IW_OAUTH_CLIENT_ID=i\n=IW_OAUTH_CLIENT_SECRET=s\n' >"$c/seed-mixed"
printf '=IW_API_KEY=k\r\nX-Injected: yes\n=IW_UNKNOWN_\xff=1\n' >"$c/seed-crlf"
# json_read: a flags byte (odd: JSON_REJECT_DUPLICATES), then the text
j="$C/json_read"
{ printf '\001'; cat "$minimal"; } >"$j/seed-job"
printf '\001{"jobId":"b-1-7","userId":"u-7","action":"transaction","payload":{"amount":7,"currency":"EUR"}}' >"$j/seed-job-bench"
printf '\000{"id":"ext-1","status":"pending","message":"Request received","trackingId":"trk-1"}' >"$j/seed-answer"
printf '\000[1,-0,0,2.5,-1e3,1E+2,0.1e-2,9223372036854775807,-9223372036854775808,1e-400]' >"$j/seed-numbers"
printf '\000[9223372036854775808]' >"$j/seed-big-integer"
printf '\000[1e400]' >"$j/seed-big-real"
printf '\000[true,false,null,"",[],{}]' >"$j/seed-literals"
printf '\001{"a":1,"a":2}' >"$j/seed-duplicate"
printf '\000{"a":1,"a":2}' >"$j/seed-duplicate-kept"
printf '\000{"a":"\\u0000","b":"\\ud800","c":"\\ud83d\\ude00","d":"q\\"\\n"}' >"$j/seed-escapes"
printf '\000{"caf\303\251":"\342\202\254 \360\237\230\200"}' >"$j/seed-utf8"
printf '\000{"a":"\300\200"}' >"$j/seed-overlong"
printf '\000{"a":"\355\240\200"}' >"$j/seed-surrogate-utf8"
printf '\000{"a":1}\013' >"$j/seed-vt-space"
printf '\000{"a":"x\ty"}' >"$j/seed-control"
printf '\000"top"' >"$j/seed-scalar"
printf '\000{}x' >"$j/seed-trailing"
printf '\000[/* c */1]' >"$j/seed-comment"
{ printf '\000'; printf '[%.0s' $(seq 70); printf ']%.0s' $(seq 70); } >"$j/seed-deep"
printf '\000\t{\r\n"a" : [ 1 , 2 ] }\r\n' >"$j/seed-whitespace"
echo "seeds written under $C"
