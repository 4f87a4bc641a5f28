/**
 * The client code "Insert client code" puts in a notebook: attach to a running cluster by
 * its id (Cluster.from_file finds it in the Jupyter runtime dir the kernel shares with the
 * server), connect a client and wait for the cluster's engines.
 */
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';

/** The source of the cell connecting to cluster `id` and waiting for `n` engines. */
export function clientCode(id: string, n: number): string {
  return [
    'import jupyter_ext as jx',
    `cluster = jx.Cluster.from_file(${JSON.stringify(id)})`,
    'rc = cluster.connect_client_sync()',
    `rc.wait_for_engines(${n})`
  ].join('\n');
}

/**
 * Insert `source` as a new code cell below the active cell of the current notebook.
 *
 * Returns false when no notebook is open.
 */
export function insertCodeCell(tracker: INotebookTracker, source: string): boolean {
  const panel = tracker.currentWidget;
  if (!panel) {
    return false;
  }
  const notebook = panel.content;
  const active = notebook.activeCell;
  const emptyCode =
    active !== null &&
    active.model.type === 'code' &&
    active.model.sharedModel.getSource().trim() === '';
  if (!emptyCode) {
    // a new notebook's single empty cell is reused rather than left above ours
    NotebookActions.insertBelow(notebook);
    NotebookActions.changeCellType(notebook, 'code');
  }
  notebook.activeCell?.model.sharedModel.setSource(source);
  return true;
}
