/** The sidebar icon: a controller linked to three engines (themed through jp-icon3). */
import { LabIcon } from '@jupyterlab/ui-components';

const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="12" cy="5" r="3"/>
    <circle cx="4.5" cy="19" r="2.5"/>
    <circle cx="12" cy="19" r="2.5"/>
    <circle cx="19.5" cy="19" r="2.5"/>
    <path d="M11.2 7.5h1.6v3.7h6.5v5.3h-1.6v-3.7h-4.9v3.7h-1.6v-3.7H6.3v3.7H4.7v-5.3h6.5z"/>
  </g>
</svg>`;

export const clusterIcon = new LabIcon({ name: 'jupyter-px:clusters', svgstr: svg });
