// Command argocd-health runs an Argo CD resource health check, health.lua, the way
// Argo CD's application controller runs one installed through argocd-cm
// (resource.customizations.health.<group>_<kind>), in the Lua VM Argo CD embeds:
//
//	argocd-health HEALTH_LUA < object.json
//
// It prints the script's verdict as {"status": "...", "message": "..."}. The
// contract is argo-cd's util/lua (VM.runLua, decodeValue, ExecuteHealthLua):
// the object is the global `obj`, the script returns a table with status and
// message, a status outside Argo CD's health codes becomes Unknown, and the
// script has one second.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// Argo CD's health.HealthStatusCode values (gitops-engine pkg/health).
var healthCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true,
	"Healthy": true, "Degraded": true, "Missing": true,
}

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health HEALTH_LUA < object.json")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-health:", err)
		os.Exit(1)
	}
}

func run(scriptPath string, in io.Reader, out io.Writer) error {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return err
	}
	data, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	// Plain json.Unmarshal: numbers become float64 and so Lua numbers, as in
	// Argo CD, whose objects hold int64 or float64 and never json.Number.
	var obj map[string]any
	if err := json.Unmarshal(data, &obj); err != nil {
		return fmt.Errorf("reading the object from stdin: %w", err)
	}
	v, err := evaluate(string(script), obj)
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(v)
}

func evaluate(script string, obj map[string]any) (verdict, error) {
	// A check installed through argocd-cm runs without Lua's standard libraries
	// unless resource.customizations.useOpenLibs is set for its kind: only
	// package, base and table, and an os with time and date. os is left out
	// here, so a script that passes here runs there; a check that read the
	// clock could not be tested by fixed cases anyway.
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return verdict{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", decodeValue(l, obj))
	if err := l.DoString(script); err != nil {
		return verdict{}, err
	}
	return healthStatus(l.Get(-1))
}

// healthStatus reads the script's return value as ExecuteHealthLua does.
func healthStatus(ret lua.LValue) (verdict, error) {
	switch ret.Type() {
	case lua.LTNil:
		return verdict{}, nil
	case lua.LTTable:
	default:
		return verdict{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
	tbl := ret.(*lua.LTable)
	// Argo CD encodes an empty table as the JSON array [] and takes it for an
	// empty health status, which it does not check.
	if k, _ := tbl.Next(lua.LNil); k == lua.LNil {
		return verdict{}, nil
	}
	var v verdict
	for field, dst := range map[string]*string{"status": &v.Status, "message": &v.Message} {
		switch value := tbl.RawGetString(field).(type) {
		case *lua.LNilType:
		case lua.LString:
			*dst = string(value)
		default:
			return verdict{}, fmt.Errorf("%s is a %s, not a string", field, value.Type())
		}
	}
	if !healthCodes[v.Status] {
		return verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return v, nil
}

// decodeValue is argo-cd util/lua's decodeValue for what encoding/json yields.
func decodeValue(l *lua.LState, value any) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case string:
		return lua.LString(converted)
	case []any:
		arr := l.CreateTable(len(converted), 0)
		for _, item := range converted {
			arr.Append(decodeValue(l, item))
		}
		return arr
	case map[string]any:
		tbl := l.CreateTable(0, len(converted))
		for key, item := range converted {
			tbl.RawSetH(lua.LString(key), decodeValue(l, item))
		}
		return tbl
	}
	return lua.LNil
}
