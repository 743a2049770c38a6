#!/bin/sh
# Berth test engine (NOT vLLM): answers one HTTP request per connection, run by `nc -ll -e`.
# The bodies were prepared by the `vllm` script and come in through the environment.
CR=$(printf '\r')
IFS=' ' read -r method target _ || exit 0
length=0
while IFS= read -r line; do
    line=${line%"$CR"}
    [ -z "$line" ] && break
    case $line in
    [Cc]ontent-[Ll]ength:*)
        length=${line#*:}
        length=${length# }
        ;;
    esac
done
case $length in '' | *[!0-9]*) length=0 ;; esac
[ "$length" -gt 0 ] && head -c "$length" >/dev/null

respond() { # STATUS CONTENT-TYPE BODY
    size=$(printf '%s' "$3" | wc -c)
    printf 'HTTP/1.1 %s\r\n' "$1"
    printf 'date: %s\r\nserver: berth-test-engine\r\n' "$(date -u +'%a, %d %b %Y %H:%M:%S GMT')"
    [ -n "$2" ] && printf 'content-type: %s\r\n' "$2"
    printf 'content-length: %s\r\nconnection: close\r\n\r\n%s' "$size" "$3"
}
json() { respond "$1" application/json "$2"; }

completion() { # OBJECT TEXT-FIELD
    now=$(date +%s)
    text="This is Berth's test engine, not a model."
    if [ "$1" = chat.completion ]; then
        choice="{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"$text\"},\"logprobs\":null,\"finish_reason\":\"stop\"}"
    else
        choice="{\"index\":0,\"text\":\"$text\",\"logprobs\":null,\"finish_reason\":\"stop\"}"
    fi
    json "200 OK" "{\"id\":\"cmpl-berthtestengine\",\"object\":\"$1\",\"created\":$now,\"model\":\"$BERTH_ENGINE_NAME\",\"choices\":[$choice],\"usage\":{\"prompt_tokens\":1,\"total_tokens\":9,\"completion_tokens\":8}}"
}

path=${target%%\?*}
case "$method $path" in
"GET /health" | "GET /ping" | "POST /ping") respond "200 OK" "" "" ;;
"GET /version") json "200 OK" "$BERTH_ENGINE_VERSION" ;;
"GET /v1/models") json "200 OK" "$BERTH_ENGINE_MODELS" ;;
"GET /metrics") respond "200 OK" "text/plain; version=0.0.4; charset=utf-8" "$BERTH_ENGINE_METRICS" ;;
"GET /load") json "200 OK" '{"server_load":0}' ;;
"POST /v1/completions") completion text_completion ;;
"POST /v1/chat/completions") completion chat.completion ;;
*" /health" | *" /version" | *" /v1/models" | *" /metrics" | *" /load" | *" /v1/completions" | \
    *" /v1/chat/completions") json "405 Method Not Allowed" '{"detail":"Method Not Allowed"}' ;;
*) json "404 Not Found" '{"detail":"Not Found"}' ;;
esac
