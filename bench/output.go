package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// writeResults writes the report's files as DIR/<UTC date>-<host>.md,
// .json and .svg, all three with the same name. Each file is written to
// a temporary file first and then linked into place, so a reader never
// sees half a file and an existing file is never overwritten: when a name
// is taken, a suffix (-2, -3, ...) is added. It returns the paths.
func writeResults(dir string, date time.Time, host string, files map[string][]byte) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("results directory: %w", err)
	}
	base := date.UTC().Format("2006-01-02") + "-" + host
	exts := []string{".md", ".json", ".svg"}
	for n := 1; n < 1000; n++ {
		name := base
		if n > 1 {
			name = fmt.Sprintf("%s-%d", base, n)
		}
		if anyExists(dir, name, exts) {
			continue
		}
		paths, err := linkAll(dir, name, exts, files)
		if errors.Is(err, fs.ErrExist) {
			continue // someone took the name meanwhile
		}
		return paths, err
	}
	return nil, fmt.Errorf("no free result name for %s in %s", base, dir)
}

func anyExists(dir, name string, exts []string) bool {
	for _, e := range exts {
		if _, err := os.Lstat(filepath.Join(dir, name+e)); !errors.Is(err, fs.ErrNotExist) {
			return true
		}
	}
	return false
}

// linkAll writes every file under name; on a name collision it removes
// what it created and returns an error matching fs.ErrExist.
func linkAll(dir, name string, exts []string, files map[string][]byte) ([]string, error) {
	var done []string
	undo := func() {
		for _, p := range done {
			os.Remove(p)
		}
	}
	for _, e := range exts {
		p := filepath.Join(dir, name+e)
		if err := writeNew(p, files[e]); err != nil {
			undo()
			return nil, err
		}
		done = append(done, p)
	}
	return done, nil
}

// writeNew writes data to path, which must not exist, atomically: a
// temporary file in the same directory, synced, then hard-linked to path
// (link fails if path exists, unlike rename).
func writeNew(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Link(tmp, path)
}

// checkWritable makes dir and checks that files can be created in it, so
// that a long run does not end unable to save its results.
func checkWritable(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("results directory %s: %w (set BENCH_OUT to a writable directory)", dir, err)
	}
	f, err := os.CreateTemp(dir, ".write-check-*.tmp")
	if err != nil {
		return fmt.Errorf("results directory %s is not writable: %w (set BENCH_OUT to a writable directory)", dir, err)
	}
	f.Close()
	return os.Remove(f.Name())
}
