// Renders an Ollama TEMPLATE for conversations the way Ollama does for a template over .Messages
// (its template package, Template.Execute): Go's text/template with missingkey=zero and the json
// function; .System holds the system messages joined by a blank line, .Messages the messages with
// consecutive ones of the same role merged (tool messages excepted).
//
// stdin: {"template": "...", "conversations": [[{"role": "...", "content": "..."}, ...], ...]}
// stdout: a JSON list with the rendered text of each conversation.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template      string      `json:"template"`
	Conversations [][]Message `json:"conversations"`
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template))
	out := []string{}
	for _, msgs := range req.Conversations {
		var system []string
		var collated []*Message
		for i := range msgs {
			if msgs[i].Role == "system" {
				system = append(system, msgs[i].Content)
			}
			if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
				collated[n-1].Content += "\n\n" + msgs[i].Content
			} else {
				collated = append(collated, &msgs[i])
			}
		}
		var b bytes.Buffer
		data := map[string]any{
			"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": nil,
			"Response": "", "Think": false, "IsThinkSet": false,
		}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
