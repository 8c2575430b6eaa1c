// Command kstatus computes kstatus, the status Flux and other `kubectl wait`-style
// tools read (sigs.k8s.io/cli-utils pkg/kstatus/status.Compute), of one object:
//
//	kstatus < object.json
//
// It prints {"status": "...", "message": "..."}, the status being one of
// InProgress, Failed, Current, Terminating, NotFound or Unknown.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: kstatus < object.json")
		os.Exit(2)
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	// Unstructured's own decoding keeps integers int64, as client-go hands them
	// to kstatus: with float64 its generation check would find no generation.
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(data); err != nil {
		return fmt.Errorf("reading the object from stdin: %w", err)
	}
	res, err := status.Compute(u)
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(result{Status: res.Status.String(), Message: res.Message})
}
